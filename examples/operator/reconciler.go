package main

import (
	"context"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/predicate"

	"github.com/guilhem/operator-plugin-framework/go/pluginsource"
	"github.com/guilhem/operator-plugin-framework/go/registry"

	demov1 "github.com/guilhem/operator-plugin-framework/examples/gen/demo/v1"
)

const (
	// PluginAnnotation names the plugin that validates a ConfigMap;
	// ConfigMaps without it are left alone.
	PluginAnnotation = "validate.example.com/plugin"
	// VerdictAnnotation is where the reconciler writes the plugin's
	// verdict.
	VerdictAnnotation = "validate.example.com/verdict"
	// pluginField indexes ConfigMaps by the plugin they name.
	pluginField = "metadata.annotations.validate.example.com/plugin"
)

func pluginOf(o client.Object) string { return o.GetAnnotations()[PluginAnnotation] }

// setup registers the ConfigMap controller with mgr: it reconciles every
// ConfigMap that names a plugin, and again when that plugin registers or
// leaves.
func setup(ctx context.Context, mgr ctrl.Manager, plugins *registry.Registry) error {
	if err := pluginsource.IndexPlugin(ctx, mgr.GetFieldIndexer(), &corev1.ConfigMap{}, pluginField, pluginOf); err != nil {
		return err
	}
	usesPlugin := predicate.NewPredicateFuncs(func(o client.Object) bool { return pluginOf(o) != "" })
	return ctrl.NewControllerManagedBy(mgr).
		For(&corev1.ConfigMap{}, builder.WithPredicates(usesPlugin)).
		WatchesRawSource(pluginsource.Source(plugins,
			pluginsource.ObjectsUsing(mgr.GetClient(), &corev1.ConfigMapList{}, pluginField))).
		Complete(&ConfigMapValidator{Client: mgr.GetClient(), Plugins: plugins})
}

// ConfigMapValidator asks the plugin a ConfigMap names about it, and writes
// the verdict into the ConfigMap.
type ConfigMapValidator struct {
	client.Client
	Plugins registry.Plugins // a *registry.Registry, or a fake in tests
}

// Reconcile validates one ConfigMap through its plugin.
func (r *ConfigMapValidator) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	var cm corev1.ConfigMap
	if err := r.Get(ctx, req.NamespacedName, &cm); err != nil {
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	name := pluginOf(&cm)
	if name == "" {
		return ctrl.Result{}, nil
	}

	p, err := r.Plugins.Get(name)
	if err != nil { // registry.ErrNotFound: its registration will trigger a reconcile
		log.FromContext(ctx).V(1).Info("waiting for the plugin", "plugin", name)
		return ctrl.Result{}, nil
	}
	// On shutdown controller-runtime cancels ctx but waits for reconciles
	// in flight: finish the call and the write under a bound of our own,
	// shorter than the server's drain timeout (docs/operators.md).
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second) // reaches the plugin
	defer cancel()
	resp, err := demov1.NewValidatorServiceClient(p).Validate(ctx, &demov1.ValidateRequest{
		Resource: &demov1.Resource{Kind: "ConfigMap", Namespace: cm.Namespace, Name: cm.Name, Labels: cm.Labels},
	})
	if err != nil {
		return ctrl.Result{}, err // a gRPC status, as from any gRPC server
	}

	for _, v := range resp.GetVerdict().GetViolations() {
		log.FromContext(ctx).Info("ConfigMap breaks a rule", "rule", v.GetRule(), "problem", v.GetMessage())
	}
	verdict := verdictOf(resp)
	if cm.Annotations[VerdictAnnotation] == verdict {
		return ctrl.Result{}, nil
	}
	patch := client.MergeFrom(cm.DeepCopy())
	cm.Annotations[VerdictAnnotation] = verdict
	return ctrl.Result{}, r.Patch(ctx, &cm, patch)
}

// verdictOf sums a verdict up: "ok", or the rules broken.
func verdictOf(resp *demov1.ValidateResponse) string {
	vs := resp.GetVerdict().GetViolations()
	if len(vs) == 0 {
		return "ok"
	}
	s := fmt.Sprintf("%d rule(s) broken:", len(vs))
	for _, v := range vs {
		s += " " + v.GetRule()
	}
	return s
}
