package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
)

// startEnvtest starts a local etcd and kube-apiserver for as long as ctx
// lasts, writes a kubeconfig for them to kubeconfig, and creates a sample
// ConfigMap that names the "validator" plugin.
func startEnvtest(ctx context.Context, kubeconfig string) (*rest.Config, error) {
	assets, err := findAssets()
	if err != nil {
		return nil, err
	}
	env := &envtest.Environment{BinaryAssetsDirectory: assets}
	cfg, err := env.Start()
	if err != nil {
		return nil, fmt.Errorf("envtest: %w", err)
	}
	context.AfterFunc(ctx, func() { _ = env.Stop() })
	log := ctrl.Log.WithName("envtest")

	user, err := env.AddUser(envtest.User{Name: "developer", Groups: []string{"system:masters"}}, nil)
	if err == nil {
		var b []byte
		if b, err = user.KubeConfig(); err == nil {
			err = os.WriteFile(kubeconfig, b, 0o600)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("envtest kubeconfig: %w", err)
	}
	log.Info("local API server running", "kubeconfig", kubeconfig,
		"try", "kubectl --kubeconfig "+kubeconfig+" get configmap settings -o yaml")

	c, err := client.New(cfg, client.Options{})
	if err != nil {
		return nil, err
	}
	sample := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{
		Namespace: "default", Name: "settings",
		Annotations: map[string]string{PluginAnnotation: "validator"},
	}}
	if err := c.Create(ctx, sample); err != nil {
		return nil, fmt.Errorf("sample ConfigMap: %w", err)
	}
	return cfg, nil
}

// findAssets returns where etcd and kube-apiserver are: KUBEBUILDER_ASSETS,
// or the .cache/k8s/bin folder that `go run mage.go k8s:binaries` fills, in
// the working directory or one above it.
func findAssets() (string, error) {
	if dir := os.Getenv("KUBEBUILDER_ASSETS"); dir != "" {
		return dir, nil
	}
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		bin := filepath.Join(dir, ".cache", "k8s", "bin")
		if _, err := os.Stat(filepath.Join(bin, "kube-apiserver")); err == nil {
			return bin, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no kube-apiserver in KUBEBUILDER_ASSETS or .cache/k8s/bin: run `go run mage.go k8s:binaries` from the repository root")
		}
		dir = parent
	}
}
