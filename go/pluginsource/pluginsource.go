// Package pluginsource triggers reconciles when plugins arrive or leave.
//
// A reconciler that found no instance of a plugin should not poll with
// RequeueAfter: it returns, and runs again as soon as the plugin
// registers. Source turns the registry's watch into reconcile requests,
// and ObjectsUsing maps a plugin name to the objects that use it through a
// field index (IndexPlugin):
//
//	err := pluginsource.IndexPlugin(ctx, mgr.GetFieldIndexer(), &corev1.ConfigMap{}, field, pluginOf)
//	...
//	err = ctrl.NewControllerManagedBy(mgr).
//		For(&corev1.ConfigMap{}).
//		WatchesRawSource(pluginsource.Source(srv.GetRegistry(),
//			pluginsource.ObjectsUsing(mgr.GetClient(), &corev1.ConfigMapList{}, field))).
//		Complete(r)
package pluginsource

import (
	"context"
	"fmt"

	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/util/workqueue"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"
	"sigs.k8s.io/controller-runtime/pkg/source"

	"github.com/guilhem/operator-plugin-framework/go/registry"
)

// Watcher is what Source needs of a registry: *registry.Registry is one.
type Watcher interface {
	Watch(ctx context.Context) <-chan registry.Event
}

// MapFunc returns the requests to enqueue for a registration or departure.
type MapFunc func(ctx context.Context, ev registry.Event) []reconcile.Request

// Source is a controller-runtime source (for WatchesRawSource) that, for
// every registration and departure of a plugin instance, enqueues the
// requests fn returns. When the controller starts it also sees a
// Registered event for every instance connected then. Requests for one
// object coalesce in the queue, so several instances registering at once
// reconcile it once.
func Source(w Watcher, fn MapFunc) source.Source {
	return source.Func(func(ctx context.Context, q workqueue.TypedRateLimitingInterface[reconcile.Request]) error {
		events := w.Watch(ctx)
		go func() {
			for ev := range events { // closed when ctx ends
				for _, req := range fn(ctx, ev) {
					q.Add(req)
				}
			}
		}()
		return nil
	})
}

// IndexPlugin indexes objects like obj under field by the plugin they use,
// pluginOf(object), which is "" for an object that uses none. Give field
// to ObjectsUsing, and call IndexPlugin before the manager starts.
func IndexPlugin(ctx context.Context, indexer client.FieldIndexer, obj client.Object, field string, pluginOf func(client.Object) string) error {
	return indexer.IndexField(ctx, obj, field, func(o client.Object) []string {
		if name := pluginOf(o); name != "" {
			return []string{name}
		}
		return nil
	})
}

// ObjectsUsing maps a plugin's events to a request for every object of
// list's kind whose field index (IndexPlugin) holds the plugin's name. A
// failed list is logged with the logger of the source's context and maps
// to nothing.
func ObjectsUsing(c client.Reader, list client.ObjectList, field string) MapFunc {
	return func(ctx context.Context, ev registry.Event) []reconcile.Request {
		l := list.DeepCopyObject().(client.ObjectList)
		if err := c.List(ctx, l, client.MatchingFields{field: ev.Instance.Name}); err != nil {
			log.FromContext(ctx).Error(err, "listing the objects that use a plugin", "plugin", ev.Instance.Name, "field", field)
			return nil
		}
		var reqs []reconcile.Request
		err := meta.EachListItem(l, func(o runtime.Object) error {
			obj, ok := o.(client.Object)
			if !ok {
				return fmt.Errorf("%T is not a client.Object", o)
			}
			reqs = append(reqs, reconcile.Request{NamespacedName: types.NamespacedName{Namespace: obj.GetNamespace(), Name: obj.GetName()}})
			return nil
		})
		if err != nil {
			log.FromContext(ctx).Error(err, "reading the objects that use a plugin", "plugin", ev.Instance.Name)
		}
		return reqs
	}
}
