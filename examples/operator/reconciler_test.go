package main

import (
	"context"
	"fmt"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"

	"github.com/guilhem/operator-plugin-framework/go/plugintest"
	"github.com/guilhem/operator-plugin-framework/go/registry"

	demov1 "github.com/guilhem/operator-plugin-framework/examples/gen/demo/v1"
	"github.com/guilhem/operator-plugin-framework/examples/validator"
)

func sample(annotations map[string]string) *corev1.ConfigMap {
	return &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "settings", Annotations: annotations}}
}

var settings = ctrl.Request{NamespacedName: types.NamespacedName{Namespace: "default", Name: "settings"}}

// reconcile runs one reconcile of the sample ConfigMap and returns its
// verdict annotation.
func reconcile(t *testing.T, c client.Client, plugins registry.Plugins) (ctrl.Result, string, error) {
	t.Helper()
	r := &ConfigMapValidator{Client: c, Plugins: plugins}
	res, err := r.Reconcile(context.Background(), settings)
	var cm corev1.ConfigMap
	if gerr := c.Get(context.Background(), settings.NamespacedName, &cm); gerr != nil {
		t.Fatal(gerr)
	}
	return res, cm.Annotations[VerdictAnnotation], err
}

// The reconciler against a real plugin server and plugin (the test kit),
// with controller-runtime's fake client: no cluster, no process, no socket.
func TestReconcileWithTheTestKit(t *testing.T) {
	op := plugintest.New(t)
	c := fake.NewClientBuilder().WithObjects(sample(map[string]string{PluginAnnotation: "validator"})).Build()

	// No plugin yet: nothing to do until it registers, and no polling.
	res, verdict, err := reconcile(t, c, op.Registry())
	if err != nil || res != (ctrl.Result{}) || verdict != "" {
		t.Fatalf("without the plugin: %+v, verdict %q, %v; want an empty result and no verdict", res, verdict, err)
	}

	plugin := op.StartPlugin("validator", &demov1.ValidatorService_ServiceDesc, &validator.Server{})
	res, verdict, err = reconcile(t, c, op.Registry())
	if err != nil || res != (ctrl.Result{}) {
		t.Fatalf("with the plugin: %+v, %v", res, err)
	}
	if want := "2 rule(s) broken: team-label no-default-namespace"; verdict != want {
		t.Fatalf("verdict %q, want %q", verdict, want)
	}

	// A failing plugin fails the reconcile with its status, so that
	// controller-runtime retries with backoff.
	plugin.Fail(status.Error(codes.Unavailable, "rules are reloading"))
	if _, _, err := reconcile(t, c, op.Registry()); status.Code(err) != codes.Unavailable {
		t.Fatalf("a failing plugin: %v, want UNAVAILABLE", err)
	}
}

// fakePlugins is a hand-written registry.Plugins: here, a plugin that is
// never connected.
type fakePlugins struct{}

func (fakePlugins) Get(name string, _ ...registry.Option) (*registry.PluginProvider, error) {
	return nil, fmt.Errorf("plugin %q: %w", name, registry.ErrNotFound)
}

func (fakePlugins) Wait(ctx context.Context, name string, _ ...registry.Option) (*registry.PluginProvider, error) {
	<-ctx.Done()
	return nil, ctx.Err()
}

func TestReconcileWithAFake(t *testing.T) {
	c := fake.NewClientBuilder().WithObjects(sample(map[string]string{PluginAnnotation: "validator"})).Build()
	if res, verdict, err := reconcile(t, c, fakePlugins{}); err != nil || res != (ctrl.Result{}) || verdict != "" {
		t.Fatalf("%+v, verdict %q, %v", res, verdict, err)
	}
}

func TestReconcileIgnoresConfigMapsWithoutPlugin(t *testing.T) {
	op := plugintest.New(t)
	plugin := op.StartPlugin("validator", &demov1.ValidatorService_ServiceDesc, &validator.Server{})
	c := fake.NewClientBuilder().WithObjects(sample(nil)).Build()
	if _, verdict, err := reconcile(t, c, op.Registry()); err != nil || verdict != "" || plugin.Calls() != 0 {
		t.Fatalf("verdict %q, %v, %d calls; want nothing", verdict, err, plugin.Calls())
	}
}
