package pluginsource_test

import (
	"context"

	corev1 "k8s.io/api/core/v1"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	"github.com/guilhem/operator-plugin-framework/go/pluginsource"
	"github.com/guilhem/operator-plugin-framework/go/server"
)

// A controller for ConfigMaps that name their plugin in an annotation: each
// ConfigMap is reconciled again when its plugin registers or leaves.
func ExampleSource() {
	var (
		mgr ctrl.Manager   // ctrl.NewManager(...)
		srv *server.Server // server.New(...), added to mgr
		r   reconcile.Reconciler
		ctx = context.Background()
	)
	if mgr == nil {
		return // a manager needs a cluster; the calls are what matters
	}
	const field = "metadata.annotations.plugin"
	pluginOf := func(o client.Object) string { return o.GetAnnotations()["example.com/plugin"] }
	if err := pluginsource.IndexPlugin(ctx, mgr.GetFieldIndexer(), &corev1.ConfigMap{}, field, pluginOf); err != nil {
		panic(err)
	}
	err := ctrl.NewControllerManagedBy(mgr).
		For(&corev1.ConfigMap{}).
		WatchesRawSource(pluginsource.Source(srv.GetRegistry(),
			pluginsource.ObjectsUsing(mgr.GetClient(), &corev1.ConfigMapList{}, field))).
		Complete(r)
	if err != nil {
		panic(err)
	}
}
