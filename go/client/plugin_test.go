package client

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
)

// unixTarget returns a short unix socket target in a new directory.
func unixTarget(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "opfc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return "unix://" + filepath.Join(dir, "s.sock")
}

// TestRegistrarShape: the plugin is built as a grpc.Server is — services
// registered with the generated function, then Start, a controller-runtime
// Runnable that returns once ctx ends and the plugin has drained.
func TestRegistrarShape(t *testing.T) {
	target := unixTarget(t)
	srv, _ := startServer(t, target)
	p, err := NewPlugin("shape", target, "v1", WithUnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		return handler(ctx, req)
	}))
	if err != nil {
		t.Fatal(err)
	}
	var _ grpc.ServiceRegistrar = p
	testgrpc.RegisterTestServiceServer(p, empty{})
	if p.NeedLeaderElection() {
		t.Error("a plugin must run whether or not its manager leads")
	}
	ctx, cancel := context.WithCancel(context.Background())
	started := make(chan error, 1)
	go func() { started <- p.Start(ctx) }()

	wctx, wcancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer wcancel()
	provider, err := srv.GetRegistry().Wait(wctx, "shape")
	if err != nil {
		t.Fatal(err)
	}
	if got := provider.Instances()[0].Services; len(got) != 1 || got[0] != "grpc.testing.TestService" {
		t.Errorf("registered services %v", got)
	}
	if err := p.Start(ctx); err == nil || !strings.Contains(err.Error(), "already started") {
		t.Errorf("second Start: %v, want an error", err)
	}
	func() {
		defer func() {
			if recover() == nil {
				t.Error("RegisterService after Start did not panic")
			}
		}()
		testgrpc.RegisterUnimplementedServiceServer(p, testgrpc.UnimplementedUnimplementedServiceServer{})
	}()
	cancel()
	select {
	case err := <-started:
		if err != nil {
			t.Errorf("Start: %v", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("Start did not return after ctx ended")
	}
}

func TestStartWithoutService(t *testing.T) {
	p, err := NewPlugin("none", "unix:///tmp/none.sock", "v1")
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Start(context.Background()); err == nil || !strings.Contains(err.Error(), "no service") {
		t.Errorf("Start: %v, want a no-service error", err)
	}
	p.Close() // never started: returns at once
}

// TestNewRefusesWhatCannotWork: targets that can never be dialled and
// registrations the operator must refuse fail in New, not in a retry loop.
func TestNewRefusesWhatCannotWork(t *testing.T) {
	for _, c := range []struct{ name, target, version, want string }{
		{"p", "http://localhost:1234", "v1", `scheme "http" is not supported`},
		{"p", "unix://run/operator.sock", "v1", "unix:///run/operator.sock"},
		{"p", "unix:///" + strings.Repeat("x", 120), "v1", "more than the 107"},
		{"", "unix:///tmp/x.sock", "v1", "plugin name is empty"},
		{"p", "unix:///tmp/x.sock", strings.Repeat("v", 129), "version is longer"},
	} {
		_, err := New(context.Background(), c.name, c.target, c.version, &testgrpc.TestService_ServiceDesc, empty{})
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("New(%q, %q): %v, want an error containing %q", c.name, c.target, err, c.want)
		}
	}
}
