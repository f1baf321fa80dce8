package bench_test

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"sigs.k8s.io/controller-runtime/pkg/log"

	"github.com/guilhem/operator-plugin-framework/go/client"
	"github.com/guilhem/operator-plugin-framework/go/internal/bench"
	"github.com/guilhem/operator-plugin-framework/go/server"
)

func TestMain(m *testing.M) {
	log.SetLogger(logr.Discard()) // the server logs through controller-runtime
	os.Exit(m.Run())
}

func socket(b *testing.B) string {
	dir, err := os.MkdirTemp("", "opfb")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.RemoveAll(dir) })
	return filepath.Join(dir, "s.sock")
}

// direct serves the service, and the bare stream, with a plain gRPC
// server on a unix socket and returns a connection to it.
func direct(b *testing.B) *grpc.ClientConn {
	path := socket(b)
	lis, err := net.Listen("unix", path)
	if err != nil {
		b.Fatal(err)
	}
	gs := grpc.NewServer()
	testgrpc.RegisterTestServiceServer(gs, bench.Service{})
	bench.RegisterBare(gs)
	go gs.Serve(lis)
	b.Cleanup(gs.Stop)
	cc, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { cc.Close() })
	return cc
}

// tunnelled serves the same service as a plugin of an operator on a unix
// socket and returns a client that calls it through the operator's
// registry.
func tunnelled(b *testing.B) testgrpc.TestServiceClient {
	path := socket(b)
	srv, err := server.New("unix://" + path)
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.Start(ctx)
	}()
	b.Cleanup(func() { cancel(); <-done })
	if _, err := srv.Addr(ctx); err != nil {
		b.Fatal(err)
	}
	c, err := client.New(ctx, "bench", "unix://"+path, "v1", &testgrpc.TestService_ServiceDesc, bench.Service{})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close() })
	wctx, wcancel := context.WithTimeout(ctx, 10*time.Second)
	defer wcancel()
	p, err := srv.GetRegistry().Wait(wctx, "bench")
	if err != nil {
		b.Fatal(err)
	}
	return testgrpc.NewTestServiceClient(p)
}

// BenchmarkPlaintext is the "plain" mode: operator and plugin on a
// plaintext unix socket, beside direct gRPC calls and a bare stream on a
// socket of their own.
func BenchmarkPlaintext(b *testing.B) {
	cc := direct(b)
	bench.Run(b, bench.Mode{Name: "plain", Paths: []bench.NamedPath{
		{Name: "direct", Path: bench.Calls{C: testgrpc.NewTestServiceClient(cc)}},
		{Name: "bare", Path: bench.Bare{CC: cc}},
		{Name: "tunnel", Path: bench.Calls{C: tunnelled(b)}},
	}})
}
