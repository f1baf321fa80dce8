package main

import (
	"flag"
	"testing"

	"github.com/guilhem/operator-plugin-framework/examples/internal/manifests"
)

func parse(t *testing.T, c manifests.Container) *options {
	t.Helper()
	fs := flag.NewFlagSet("plugin", flag.ContinueOnError)
	o := bindFlags(fs)
	if err := manifests.ParseArgs(fs, c); err != nil {
		t.Fatal(err)
	}
	return o
}

// TestManifestsRunThisPlugin checks that this binary takes the arguments
// of the "plugin" containers of config/plugin and config/sidecar.
func TestManifestsRunThisPlugin(t *testing.T) {
	for _, variant := range []string{"plugin", "sidecar"} {
		cs, err := manifests.Containers(variant)
		if err != nil {
			t.Fatal(err)
		}
		plugins := manifests.Named(cs, "plugin")
		if len(plugins) == 0 {
			t.Fatalf("config/%s has no plugin container", variant)
		}
		for _, c := range plugins {
			if o := parse(t, c); o.operator == "" || len(o.clientOptions()) == 0 && variant == "plugin" {
				t.Fatalf("config/%s: %+v: no target, or no credentials outside the pod", variant, o)
			}
		}
	}
}

// TestSidecarSharesTheSocket checks the sidecar layout: the plugin dials
// the socket the operator listens on, in an emptyDir both mount.
func TestSidecarSharesTheSocket(t *testing.T) {
	cs, err := manifests.Containers("sidecar")
	if err != nil {
		t.Fatal(err)
	}
	managers, plugins := manifests.Named(cs, "manager"), manifests.Named(cs, "plugin")
	if len(managers) != 1 || len(plugins) != 1 || managers[0].Deployment != plugins[0].Deployment {
		t.Fatalf("want one Deployment with a manager and a plugin container, got %d and %d", len(managers), len(plugins))
	}
	listen, _ := manifests.Flag(managers[0].Args, "plugin-server-address")
	target := parse(t, plugins[0]).operator
	if listen == "" || listen != target {
		t.Fatalf("the operator listens on %q, the plugin dials %q", listen, target)
	}
	const prefix = "unix://"
	if len(target) <= len(prefix) || target[:len(prefix)] != prefix {
		t.Fatalf("the sidecar target %q is not a unix socket", target)
	}
	if manifests.SharedDir(managers[0], plugins[0], target[len(prefix):]) == "" {
		t.Fatalf("no emptyDir holds %s in both containers", target)
	}
}
