package plugintest_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/guilhem/operator-plugin-framework/go/internal/target"
	"github.com/guilhem/operator-plugin-framework/go/internal/testservice"
	"github.com/guilhem/operator-plugin-framework/go/plugintest"
	"github.com/guilhem/operator-plugin-framework/go/registry"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func startEcho(t *testing.T, op *plugintest.Operator, opts ...plugintest.PluginOption) *plugintest.Plugin {
	t.Helper()
	return op.StartPlugin("echo", &testgrpc.TestService_ServiceDesc, &testservice.Service{}, opts...)
}

func call(t *testing.T, reg registry.Plugins, timeout time.Duration) error {
	t.Helper()
	p, err := reg.Get("echo")
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	_, err = testgrpc.NewTestServiceClient(p).UnaryCall(ctx, &testgrpc.SimpleRequest{ResponseSize: 3})
	return err
}

func wantCode(t *testing.T, err error, code codes.Code, contains string) {
	t.Helper()
	if st := status.Convert(err); st.Code() != code || !strings.Contains(st.Message(), contains) {
		t.Fatalf("error %v, want %s containing %q", err, code, contains)
	}
}

func TestNoInstanceYet(t *testing.T) {
	op := plugintest.New(t)
	if err := call(t, op.Registry(), time.Second); !errors.Is(err, registry.ErrNotFound) {
		t.Fatalf("Get before any plugin: %v, want ErrNotFound", err)
	}
	_, err := testgrpc.NewTestServiceClient(op.Registry().Plugin("echo")).EmptyCall(context.Background(), &testgrpc.Empty{})
	wantCode(t, err, codes.Unavailable, `plugin "echo" is not connected`)

	p := startEcho(t, op)
	if err := call(t, op.Registry(), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if p.Calls() != 1 {
		t.Fatalf("the plugin saw %d calls, want 1", p.Calls())
	}
}

func TestFail(t *testing.T) {
	op := plugintest.New(t)
	p := startEcho(t, op)
	p.Fail(status.Error(codes.ResourceExhausted, "quota"))
	wantCode(t, call(t, op.Registry(), 5*time.Second), codes.ResourceExhausted, "quota")
	// Streams fail the same way.
	s, err := testgrpc.NewTestServiceClient(op.Registry().Plugin("echo")).StreamingOutputCall(context.Background(), &testgrpc.StreamingOutputCallRequest{})
	if err != nil {
		t.Fatal(err)
	}
	_, err = s.Recv()
	wantCode(t, err, codes.ResourceExhausted, "quota")
	p.Fail(nil)
	if err := call(t, op.Registry(), 5*time.Second); err != nil {
		t.Fatal(err)
	}
}

func TestDelay(t *testing.T) {
	op := plugintest.New(t)
	p := startEcho(t, op)
	p.Delay(time.Hour)
	start := time.Now()
	wantCode(t, call(t, op.Registry(), 100*time.Millisecond), codes.DeadlineExceeded, "")
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("a call with a 100ms deadline took %v", d)
	}
	p.Delay(50 * time.Millisecond)
	start = time.Now()
	if err := call(t, op.Registry(), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d < 50*time.Millisecond {
		t.Fatalf("a call delayed by 50ms took %v", d)
	}
}

// inFlight starts a call the plugin holds and returns its result channel
// once the plugin has it.
func inFlight(t *testing.T, op *plugintest.Operator, p *plugintest.Plugin) <-chan error {
	t.Helper()
	before := p.Calls()
	p.Delay(300 * time.Millisecond)
	errc := make(chan error, 1)
	go func() { errc <- call(t, op.Registry(), 10*time.Second) }()
	for p.Calls() == before {
		time.Sleep(time.Millisecond)
	}
	return errc
}

func TestKillMidCall(t *testing.T) {
	op := plugintest.New(t)
	p := startEcho(t, op)
	errc := inFlight(t, op, p)
	p.Kill()
	wantCode(t, <-errc, codes.Unavailable, "")
	if err := call(t, op.Registry(), time.Second); !errors.Is(err, registry.ErrNotFound) {
		t.Fatalf("after Kill: %v, want ErrNotFound", err)
	}
	_, err := testgrpc.NewTestServiceClient(op.Registry().Plugin("echo")).EmptyCall(context.Background(), &testgrpc.Empty{})
	// The registry says why the last instance left, in the engine's words.
	wantCode(t, err, codes.Unavailable, `plugin "echo" is not connected (its last instance, echo-1, left: connection to the plugin lost)`)
	// It does not come back.
	time.Sleep(300 * time.Millisecond)
	if n := len(op.Registry().List()); n != 0 {
		t.Fatalf("%d instances after Kill", n)
	}
}

func TestStopMidCallDrains(t *testing.T) {
	op := plugintest.New(t)
	p := startEcho(t, op)
	errc := inFlight(t, op, p)
	p.Stop()
	if err := <-errc; err != nil {
		t.Fatalf("a call in flight during a drain: %v", err)
	}
	if n := len(op.Registry().List()); n != 0 {
		t.Fatalf("%d instances after Stop", n)
	}
}

func TestUnixSocket(t *testing.T) {
	op := plugintest.New(t, plugintest.WithUnixSocket())
	if _, err := target.Parse(op.Target()); err != nil {
		t.Fatal(err)
	}
	startEcho(t, op)
	if err := call(t, op.Registry(), 5*time.Second); err != nil {
		t.Fatal(err)
	}
}

// fatalT records Fatalf instead of stopping the goroutine.
type fatalT struct {
	*testing.T
	msg string
}

func (f *fatalT) Fatalf(format string, args ...any) {
	f.msg = fmt.Sprintf(format, args...)
	panic(f)
}

func TestUnixSocketTooLong(t *testing.T) {
	long := filepath.Join(os.TempDir(), strings.Repeat("x", 120))
	if err := os.MkdirAll(long, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(long) })
	t.Setenv("TMPDIR", long)
	ft := &fatalT{T: t}
	func() {
		defer func() {
			if r := recover(); r != nil && r != any(ft) {
				panic(r)
			}
		}()
		plugintest.New(ft, plugintest.WithUnixSocket())
	}()
	if !strings.Contains(ft.msg, "more than the 107 a unix socket allows") || !strings.Contains(ft.msg, "TMPDIR") {
		t.Fatalf("New with a long TMPDIR failed with %q", ft.msg)
	}
}
