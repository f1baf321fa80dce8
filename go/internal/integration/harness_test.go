// Package integration_test runs the operator's server and plugins' clients
// against each other over real unix sockets.
package integration_test

import (
	"context"
	"net"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"go.uber.org/goleak"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"
	"sigs.k8s.io/controller-runtime/pkg/log"

	"github.com/guilhem/operator-plugin-framework/go/client"
	"github.com/guilhem/operator-plugin-framework/go/internal/testservice"
	"github.com/guilhem/operator-plugin-framework/go/registry"
	"github.com/guilhem/operator-plugin-framework/go/server"
)

func TestMain(m *testing.M) {
	log.SetLogger(logr.Discard())                  // the server logs through controller-runtime
	slog.SetDefault(slog.New(slog.DiscardHandler)) // and plugins through slog by default
	goleak.VerifyTestMain(m)
}

// operator is a running server.
type operator struct {
	srv    *server.Server
	reg    *registry.Registry
	target string
	stop   func()
}

// socketPath returns a short socket path (unix socket paths are limited to
// about 100 bytes, test temp dirs can be longer).
func socketPath(t testing.TB) string {
	dir, err := os.MkdirTemp("", "opf")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return filepath.Join(dir, "s.sock")
}

func startOperatorAt(t testing.TB, path string, opts ...server.Option) *operator {
	t.Helper()
	return startOperatorOn(t, "unix://"+path, opts...)
}

// startOperatorOn runs a server on addr (a unix:// target or a TCP
// address, loopback and without authentication in these tests).
func startOperatorOn(t testing.TB, addr string, opts ...server.Option) *operator {
	t.Helper()
	target := addr
	if !strings.HasPrefix(addr, "unix://") {
		opts = append([]server.Option{server.WithInsecureNoAuthentication()}, opts...)
	}
	srv, err := server.New(target, opts...)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- srv.Start(ctx) }()
	actx, acancel := context.WithTimeout(ctx, 5*time.Second)
	defer acancel()
	if _, err := srv.Addr(actx); err != nil {
		t.Fatal(err)
	}
	var once bool
	stop := func() {
		if once {
			return
		}
		once = true
		cancel()
		select {
		case err := <-errc:
			if err != nil {
				t.Errorf("server.Start: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Errorf("server did not stop")
		}
	}
	t.Cleanup(stop)
	return &operator{srv: srv, reg: srv.GetRegistry(), target: target, stop: stop}
}

// directServer serves impl on a plain gRPC server over a unix socket, the
// control that tunnelled calls are compared with.
func directServer(t testing.TB, impl testgrpc.TestServiceServer) *grpc.ClientConn {
	t.Helper()
	lis, err := net.Listen("unix", socketPath(t))
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	testgrpc.RegisterTestServiceServer(gs, impl)
	go gs.Serve(lis)
	t.Cleanup(gs.Stop)
	cc, err := grpc.NewClient("unix://"+lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

func startOperator(t testing.TB, opts ...server.Option) *operator {
	return startOperatorAt(t, socketPath(t), opts...)
}

// plugin starts a plugin serving impl and waits for its registration.
func (o *operator) plugin(t testing.TB, name string, impl testgrpc.TestServiceServer, opts ...client.Option) *client.Client {
	t.Helper()
	c, err := client.New(context.Background(), name, o.target, "v1.0.0", &testgrpc.TestService_ServiceDesc, impl, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.Ready(ctx); err != nil {
		t.Fatal(err)
	}
	return c
}

// call returns a TestService client for the plugin called name.
func (o *operator) call(t testing.TB, name string) testgrpc.TestServiceClient {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	p, err := o.reg.Wait(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	return testgrpc.NewTestServiceClient(p)
}

func ctxTimeout(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func wantCode(t testing.TB, err error, code codes.Code) {
	t.Helper()
	if got := status.Code(err); got != code {
		t.Fatalf("got %v (%v), want %v", got, err, code)
	}
}

// The service every test plugin serves, and its helpers.
type testService = testservice.Service

var (
	payload = testservice.Payload
	sizes   = testservice.Sizes
)

func must[T any](t testing.TB) func(T, error) T {
	return func(v T, err error) T {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
}

func backoffConfig(base, maxDelay time.Duration) backoff.Config {
	return backoff.Config{BaseDelay: base, Multiplier: 1.6, Jitter: 0.2, MaxDelay: maxDelay}
}
