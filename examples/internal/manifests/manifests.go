// Package manifests renders the repository's kustomize manifests (config/)
// as `kubectl kustomize` does, for the examples' tests that check the
// manifests against the example binaries.
package manifests

import (
	"flag"
	"fmt"
	"io"
	"path/filepath"
	"runtime"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"
)

// Container is one container of a rendered Deployment, with the pod's
// volumes.
type Container struct {
	Deployment string
	corev1.Container
	Volumes []corev1.Volume
}

// Containers renders config/<variant> and returns the containers of its
// Deployments.
func Containers(variant string) ([]Container, error) {
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		return nil, fmt.Errorf("cannot locate config/")
	}
	dir := filepath.Join(filepath.Dir(file), "..", "..", "..", "config", variant)
	res, err := krusty.MakeKustomizer(krusty.MakeDefaultOptions()).Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		return nil, fmt.Errorf("kustomize config/%s: %w", variant, err)
	}
	var out []Container
	for _, r := range res.Resources() {
		if r.GetKind() != "Deployment" {
			continue
		}
		b, err := r.AsYAML()
		if err != nil {
			return nil, err
		}
		var d appsv1.Deployment
		if err := yaml.UnmarshalStrict(b, &d); err != nil {
			return nil, fmt.Errorf("config/%s: Deployment %s: %w", variant, r.GetName(), err)
		}
		for _, c := range d.Spec.Template.Spec.Containers {
			out = append(out, Container{Deployment: d.Name, Container: c, Volumes: d.Spec.Template.Spec.Volumes})
		}
	}
	return out, nil
}

// Named returns the containers called name.
func Named(cs []Container, name string) []Container {
	var out []Container
	for _, c := range cs {
		if c.Name == name {
			out = append(out, c)
		}
	}
	return out
}

// Flag returns the value of --name=value in args.
func Flag(args []string, name string) (string, bool) {
	for _, a := range args {
		if v, ok := strings.CutPrefix(a, "--"+name+"="); ok {
			return v, true
		}
	}
	return "", false
}

// SharedDir is the emptyDir volume that both containers mount at the
// directory holding path, or "" when there is none.
func SharedDir(a, b Container, path string) string {
	dir := filepath.Dir(path)
	mount := func(c Container) string {
		for _, m := range c.VolumeMounts {
			if m.MountPath == dir {
				return m.Name
			}
		}
		return ""
	}
	name := mount(a)
	if name == "" || mount(b) != name {
		return ""
	}
	for _, v := range a.Volumes {
		if v.Name == name && v.EmptyDir != nil {
			return name
		}
	}
	return ""
}

// ParseArgs parses a container's arguments with a binary's flag set (made
// with flag.ContinueOnError): an unknown flag, a value that does not parse
// or an argument left over is an error.
func ParseArgs(fs *flag.FlagSet, c Container) error {
	fs.SetOutput(io.Discard)
	if err := fs.Parse(c.Args); err != nil {
		return fmt.Errorf("deployment %s, container %s: %w (args %q)", c.Deployment, c.Name, err, c.Args)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("deployment %s, container %s: arguments left over: %q", c.Deployment, c.Name, fs.Args())
	}
	return nil
}
