//go:build mage

package main

import (
	"context"
	"fmt"
	"time"

	"github.com/magefile/mage/mg"
)

// E2E runs the end-to-end security tests (go/internal/e2e) against the real
// Kubernetes binaries: etcd and kube-apiserver through envtest, and
// kube-rbac-proxy, and the adversarial tests (go/internal/hostile), whose
// attacks on authentication need the API server. It builds the binaries
// first when they are missing (K8s.Binaries; minutes the first time,
// nothing afterwards).
func E2E(ctx context.Context) error {
	mg.CtxDeps(ctx, K8s.Binaries)
	start := time.Now()
	args := []string{"test", "-race", "-count=1", "-timeout=10m"}
	if mg.Verbose() {
		args = append(args, "-v")
	}
	err := runIn("go", map[string]string{
		"KUBEBUILDER_ASSETS": k8sAssetsDir(),
		"KUBE_RBAC_PROXY":    k8sRBACProxyPath(),
	}, mg.GoCmd(), append(args, "./internal/e2e/", "./internal/hostile/")...)
	fmt.Printf("e2e: %s\n", time.Since(start).Round(time.Second))
	return err
}
