package plugintest_test

import (
	"context"
	"errors"
	"fmt"
	"time"

	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/guilhem/operator-plugin-framework/go/internal/testservice"
	"github.com/guilhem/operator-plugin-framework/go/plugintest"
	"github.com/guilhem/operator-plugin-framework/go/registry"
)

// exampleT stands for the *testing.T of a test.
type exampleT struct{ cleanups []func() }

func (t *exampleT) Helper()                           {}
func (t *exampleT) Cleanup(f func())                  { t.cleanups = append(t.cleanups, f) }
func (t *exampleT) Fatalf(format string, args ...any) { panic(fmt.Sprintf(format, args...)) }
func (t *exampleT) Logf(string, ...any)               {}
func (t *exampleT) done() {
	for i := len(t.cleanups) - 1; i >= 0; i-- {
		t.cleanups[i]()
	}
}

// What a reconciler's test does: call through the registry before the
// plugin is there, once it is, while it fails, and after it left.
func Example() {
	t := &exampleT{} // in a test: the *testing.T
	defer t.done()

	op := plugintest.New(t)
	var plugins registry.Plugins = op.Registry() // what the reconciler gets
	call := func() error {
		p, err := plugins.Get("echo")
		if err != nil {
			return err
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, err = testgrpc.NewTestServiceClient(p).EmptyCall(ctx, &testgrpc.Empty{})
		return err
	}

	fmt.Println("before:", errors.Is(call(), registry.ErrNotFound))
	plugin := op.StartPlugin("echo", &testgrpc.TestService_ServiceDesc, &testservice.Service{})
	fmt.Println("registered:", call())
	plugin.Fail(status.Error(codes.Unavailable, "down"))
	fmt.Println("failing:", status.Code(call()))
	plugin.Kill()
	fmt.Println("killed:", errors.Is(call(), registry.ErrNotFound))
	// Output:
	// before: true
	// registered: <nil>
	// failing: Unavailable
	// killed: true
}
