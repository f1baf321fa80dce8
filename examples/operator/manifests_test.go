package main

import (
	"flag"
	"testing"

	"k8s.io/client-go/rest"

	"github.com/guilhem/operator-plugin-framework/go/server"

	"github.com/guilhem/operator-plugin-framework/examples/internal/manifests"
)

// TestManifestsRunThisOperator renders every variant of config/ that runs
// an operator and checks that this binary takes the arguments its
// "manager" container passes: every flag exists, every value parses, the
// security flags go together, and the server takes the listen address (the
// certificate files exist only in the pod).
func TestManifestsRunThisOperator(t *testing.T) {
	for _, variant := range []string{"sidecar", "builtin", "kube-rbac-proxy"} {
		t.Run(variant, func(t *testing.T) {
			cs, err := manifests.Containers(variant)
			if err != nil {
				t.Fatal(err)
			}
			managers := manifests.Named(cs, "manager")
			if len(managers) == 0 {
				t.Fatalf("config/%s has no manager container", variant)
			}
			for _, c := range managers {
				fs := flag.NewFlagSet("operator", flag.ContinueOnError)
				o := bindFlags(fs)
				if err := manifests.ParseArgs(fs, c); err != nil {
					t.Fatal(err)
				}
				if _, err := o.serverOptions(&rest.Config{Host: "https://kubernetes.default.svc"}); err != nil {
					t.Fatalf("Deployment %s: %v", c.Deployment, err)
				}
				// The certificates exist only in the pod: the address alone is checked.
				if _, err := server.New(o.pluginServerAddress, server.WithInsecureNoAuthentication()); err != nil {
					t.Fatalf("Deployment %s: %v", c.Deployment, err)
				}
			}
		})
	}
}
