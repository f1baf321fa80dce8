package main

import (
	"os/exec"
	"strings"
	"testing"

	"go.uber.org/goleak"
)

// TestNoKubernetesInPlugins fails when a plugin binary would link
// Kubernetes or Prometheus again: the plugin side of the framework must stay
// small (a plugin may not even run in a cluster).
func TestNoKubernetesInPlugins(t *testing.T) {
	for _, pkg := range []string{
		"github.com/guilhem/operator-plugin-framework/go/client",
		".", // this example plugin
	} {
		out, err := exec.Command("go", "list", "-deps", pkg).CombinedOutput()
		if err != nil {
			t.Fatalf("go list -deps %s: %v\n%s", pkg, err, out)
		}
		deps := strings.Fields(string(out))
		if len(deps) < 10 {
			t.Fatalf("go list -deps %s listed only %v", pkg, deps)
		}
		for _, dep := range deps {
			for _, banned := range []string{"k8s.io/", "sigs.k8s.io/", "github.com/prometheus/"} {
				if strings.HasPrefix(dep, banned) {
					t.Errorf("%s depends on %s", pkg, dep)
				}
			}
		}
	}
}

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }
