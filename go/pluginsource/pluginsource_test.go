package pluginsource_test

import (
	"context"
	"slices"
	"testing"
	"time"

	"go.uber.org/goleak"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/util/workqueue"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	"github.com/guilhem/operator-plugin-framework/go/internal/testservice"
	"github.com/guilhem/operator-plugin-framework/go/pluginsource"
	"github.com/guilhem/operator-plugin-framework/go/plugintest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const field = "metadata.annotations.plugin"

func pluginOf(o client.Object) string { return o.GetAnnotations()["plugin"] }

func configMap(name, plugin string) *corev1.ConfigMap {
	return &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: name, Annotations: map[string]string{"plugin": plugin}}}
}

// next returns the names of the requests the queue gets within a second.
func next(t *testing.T, q workqueue.TypedRateLimitingInterface[reconcile.Request], n int) []string {
	t.Helper()
	got := make(chan string, n)
	go func() {
		for range n {
			req, shutdown := q.Get()
			if shutdown {
				return
			}
			got <- req.Name
			q.Done(req)
		}
	}()
	var names []string
	deadline := time.After(time.Second)
	for len(names) < n {
		select {
		case name := <-got:
			names = append(names, name)
		case <-deadline:
			t.Fatalf("after a second the queue had %v, want %d requests", names, n)
		}
	}
	slices.Sort(names)
	return names
}

func TestPluginArrivalEnqueuesTheObjectsUsingIt(t *testing.T) {
	c := fake.NewClientBuilder().
		WithIndex(&corev1.ConfigMap{}, field, func(o client.Object) []string {
			if p := pluginOf(o); p != "" {
				return []string{p}
			}
			return nil
		}).
		WithObjects(configMap("a", "validator"), configMap("b", "validator"), configMap("c", "other"), configMap("d", "")).
		Build()
	op := plugintest.New(t)
	q := workqueue.NewTypedRateLimitingQueue(workqueue.DefaultTypedControllerRateLimiter[reconcile.Request]())
	defer q.ShutDown()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	src := pluginsource.Source(op.Registry(), pluginsource.ObjectsUsing(c, &corev1.ConfigMapList{}, field))
	if err := src.Start(ctx, q); err != nil {
		t.Fatal(err)
	}
	if q.Len() != 0 {
		t.Fatalf("%d requests before any plugin", q.Len())
	}
	p := op.StartPlugin("validator", &testgrpc.TestService_ServiceDesc, &testservice.Service{})
	if got := next(t, q, 2); !slices.Equal(got, []string{"a", "b"}) {
		t.Fatalf("on registration: %v, want [a b]", got)
	}
	p.Stop()
	if got := next(t, q, 2); !slices.Equal(got, []string{"a", "b"}) {
		t.Fatalf("on departure: %v, want [a b]", got)
	}
}

// IndexPlugin indexes what pluginOf returns, and nothing for "".
func TestIndexPlugin(t *testing.T) {
	var idx indexer
	if err := pluginsource.IndexPlugin(context.Background(), &idx, &corev1.ConfigMap{}, field, pluginOf); err != nil {
		t.Fatal(err)
	}
	if idx.field != field {
		t.Fatalf("indexed field %q", idx.field)
	}
	if got := idx.fn(configMap("a", "validator")); !slices.Equal(got, []string{"validator"}) {
		t.Fatalf("index of a ConfigMap using validator: %v", got)
	}
	if got := idx.fn(configMap("d", "")); got != nil {
		t.Fatalf("index of a ConfigMap using no plugin: %v", got)
	}
}

type indexer struct {
	field string
	fn    client.IndexerFunc
}

func (i *indexer) IndexField(_ context.Context, _ client.Object, field string, fn client.IndexerFunc) error {
	i.field, i.fn = field, fn
	return nil
}
