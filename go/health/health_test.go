package health_test

import (
	"net/http/httptest"
	"strings"
	"testing"

	"go.uber.org/goleak"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"sigs.k8s.io/controller-runtime/pkg/healthz"

	"github.com/guilhem/operator-plugin-framework/go/health"
	"github.com/guilhem/operator-plugin-framework/go/internal/testservice"
	"github.com/guilhem/operator-plugin-framework/go/plugintest"
	"github.com/guilhem/operator-plugin-framework/go/server"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func check(c healthz.Checker) error { return c(httptest.NewRequest("GET", "/readyz", nil)) }

func TestListening(t *testing.T) {
	srv, err := server.New("unix:///nonexistent-dir/operator.sock") // not started
	if err != nil {
		t.Fatal(err)
	}
	if err := check(health.Listening(srv)); err == nil {
		t.Fatal("a server that was never started passes")
	}
	op := plugintest.New(t)
	if err := check(health.Listening(op.Server())); err != nil {
		t.Fatal(err)
	}
}

func TestPlugins(t *testing.T) {
	op := plugintest.New(t)
	ready := health.Plugins(op.Registry(), "a", "b")
	if err := check(ready); err == nil || !strings.Contains(err.Error(), `"a", "b"`) {
		t.Fatalf("no plugin: %v", err)
	}
	op.StartPlugin("a", &testgrpc.TestService_ServiceDesc, &testservice.Service{})
	b := op.StartPlugin("b", &testgrpc.TestService_ServiceDesc, &testservice.Service{})
	if err := check(ready); err != nil {
		t.Fatal(err)
	}
	b.Stop()
	if err := check(ready); err == nil || !strings.Contains(err.Error(), `"b"`) || strings.Contains(err.Error(), `"a"`) {
		t.Fatalf("b gone: %v", err)
	}
}
