package registry_test

import (
	"context"
	"fmt"
	"log"
	"net"
	"time"

	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/test/bufconn"

	"github.com/guilhem/operator-plugin-framework/go/internal/testservice"
	"github.com/guilhem/operator-plugin-framework/go/registry"
	"github.com/guilhem/operator-plugin-framework/go/server"
)

// Watch turns registrations into whatever the operator needs, for example
// requeueing the objects that wait for a plugin (package pluginsource does
// that for controller-runtime).
func ExampleRegistry_Watch() {
	var reg *registry.Registry // srv.GetRegistry()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	for ev := range reg.Watch(ctx) {
		switch ev.Type {
		case registry.Registered:
			log.Printf("plugin %s %s connected (instance %s)", ev.Instance.Name, ev.Instance.Version, ev.Instance.ID)
		case registry.Unregistered:
			log.Printf("instance %s of plugin %s left", ev.Instance.ID, ev.Instance.Name)
		}
	}
}

// Every provider of this registry traces its calls with OpenTelemetry and
// bounds the calls whose context has no deadline.
func ExampleNew() {
	reg := registry.New(
		registry.WithStatsHandler(otelgrpc.NewClientHandler()),
		registry.WithDefaultTimeout(10*time.Second),
	)
	srv, err := server.New("unix:///var/run/plugins/operator.sock", server.WithRegistry(reg))
	if err != nil {
		log.Fatal(err)
	}
	_ = srv // mgr.Add(srv)
}

// A provider narrowed to one version: see WithFilter for what it costs.
func ExampleWithVersion() {
	var reg *registry.Registry // srv.GetRegistry()
	if reg == nil {
		return
	}
	p, err := reg.Get("validator", registry.WithVersion("v2.0.0"))
	if err != nil {
		return // no v2.0.0 instance connected
	}
	_ = testgrpc.NewTestServiceClient(p)
}

// fakePlugins is a hand-written registry.Plugins for a reconciler's unit
// test: every plugin is served by one in-memory gRPC server.
type fakePlugins struct{ conn grpc.ClientConnInterface }

func (f fakePlugins) Get(name string, opts ...registry.Option) (*registry.PluginProvider, error) {
	return registry.NewProvider(name, f.conn, opts...), nil
}

func (f fakePlugins) Wait(_ context.Context, name string, opts ...registry.Option) (*registry.PluginProvider, error) {
	return f.Get(name, opts...)
}

// A fake: NewProvider sends the calls to any gRPC connection, here one to
// an in-memory gRPC server.
func ExampleNewProvider() {
	lis := bufconn.Listen(1 << 20)
	gs := grpc.NewServer()
	testgrpc.RegisterTestServiceServer(gs, &testservice.Service{})
	go gs.Serve(lis)
	defer gs.Stop()
	conn, err := grpc.NewClient("passthrough:///fake",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		log.Fatal(err)
	}
	defer conn.Close()

	var plugins registry.Plugins = fakePlugins{conn: conn} // what the reconciler gets
	p, err := plugins.Get("echo")
	if err != nil {
		log.Fatal(err)
	}
	resp, err := testgrpc.NewTestServiceClient(p).UnaryCall(context.Background(), &testgrpc.SimpleRequest{ResponseSize: 3})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(len(resp.GetPayload().GetBody()), "bytes from", p.Name())
	// Output: 3 bytes from echo
}
