package integration_test

import (
	"context"
	"errors"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/guilhem/operator-plugin-framework/go/client"
	"github.com/guilhem/operator-plugin-framework/go/registry"
	"github.com/guilhem/operator-plugin-framework/go/server"
)

// blocker is a handler that waits until released or cancelled.
func blocker(started chan<- struct{}, release <-chan struct{}) func(context.Context) error {
	return func(ctx context.Context) error {
		started <- struct{}{}
		select {
		case <-release:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// freezer forwards a unix socket to another and can freeze: it then stops
// moving bytes without closing anything, as a hung process would.
type freezer struct {
	lis    net.Listener
	frozen chan struct{}
	once   sync.Once
	wg     sync.WaitGroup
	mu     sync.Mutex
	conns  []net.Conn
}

func newFreezer(t testing.TB, to string) (*freezer, string) {
	path := socketPath(t)
	lis, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	f := &freezer{lis: lis, frozen: make(chan struct{})}
	f.wg.Go(func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			up, err := net.Dial("unix", to)
			if err != nil {
				c.Close()
				continue
			}
			f.mu.Lock()
			f.conns = append(f.conns, c, up)
			f.mu.Unlock()
			f.wg.Go(func() { f.pipe(up, c) })
			f.wg.Go(func() { f.pipe(c, up) })
		}
	})
	t.Cleanup(f.close)
	return f, "unix://" + path
}

func (f *freezer) pipe(dst, src net.Conn) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		select {
		case <-f.frozen:
			return // drop everything from now on; the connection stays open
		default:
		}
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func (f *freezer) freeze() { f.once.Do(func() { close(f.frozen) }) }

func (f *freezer) close() {
	f.freeze()
	f.lis.Close()
	f.mu.Lock()
	for _, c := range f.conns {
		c.Close()
	}
	f.mu.Unlock()
	f.wg.Wait()
}

// heldCallThroughFreezer connects a plugin to op through a freezer and
// starts a call that its handler holds; the call's error comes on errc.
func heldCallThroughFreezer(t *testing.T, op *operator) (*freezer, <-chan error) {
	t.Helper()
	fr, target := newFreezer(t, strings.TrimPrefix(op.target, "unix://"))
	started := make(chan struct{}, 1)
	c, err := client.New(context.Background(), "p", target, "v1", &testgrpc.TestService_ServiceDesc,
		&testService{OnEmpty: blocker(started, nil)}, client.WithBackoff(fastBackoff))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if err := c.Ready(ctxTimeout(t, 5*time.Second)); err != nil {
		t.Fatal(err)
	}
	call := op.call(t, "p")
	errc := make(chan error, 1)
	go func() {
		_, err := call.EmptyCall(ctxTimeout(t, 30*time.Second), &testgrpc.Empty{})
		errc <- err
	}()
	<-started
	return fr, errc
}

func TestHeartbeatDetectsHungPlugin(t *testing.T) {
	const interval = 300 * time.Millisecond
	op := startOperator(t, server.WithHeartbeatInterval(interval))
	fr, errc := heldCallThroughFreezer(t, op)
	fr.freeze()
	frozenAt := time.Now()
	err := <-errc
	elapsed := time.Since(frozenAt)
	wantCode(t, err, codes.Unavailable)
	if elapsed > 2*interval {
		t.Fatalf("hung plugin detected after %v, want within two intervals (%v)", elapsed, 2*interval)
	}
	t.Logf("detected after %v (%v)", elapsed, err)
}

func TestOperatorShutdownDrainsAndPluginReconnects(t *testing.T) {
	path := socketPath(t)
	op1 := startOperatorAt(t, path)
	started := make(chan struct{}, 1)
	release := make(chan struct{})
	op1.plugin(t, "p", &testService{OnEmpty: blocker(started, release)},
		client.WithBackoff(fastBackoff))
	call := op1.call(t, "p")
	errc := make(chan error, 1)
	go func() {
		_, err := call.EmptyCall(ctxTimeout(t, 10*time.Second), &testgrpc.Empty{})
		errc <- err
	}()
	<-started
	stopped := make(chan struct{})
	go func() {
		op1.stop()
		close(stopped)
	}()
	// The operator waits for the call in flight...
	select {
	case <-stopped:
		t.Fatal("operator stopped before its call finished")
	case <-time.After(200 * time.Millisecond):
	}
	close(release)
	if err := <-errc; err != nil {
		t.Fatalf("call in flight during drain: %v", err)
	}
	<-stopped
	// ...and the plugin registers with the next operator on the same socket.
	op2 := startOperatorAt(t, path)
	if _, err := op2.call(t, "p").UnaryCall(ctxTimeout(t, 10*time.Second), &testgrpc.SimpleRequest{}); err != nil {
		t.Fatal(err)
	}
}

var fastBackoff = backoffConfig(20*time.Millisecond, 200*time.Millisecond)

func TestInstancesShareTheLoad(t *testing.T) {
	op := startOperator(t)
	var calls [2]atomic.Int32
	a := op.plugin(t, "p", &testService{OnEmpty: func(context.Context) error {
		calls[0].Add(1)
		time.Sleep(5 * time.Millisecond)
		return nil
	}})
	op.plugin(t, "p", &testService{OnEmpty: func(context.Context) error {
		calls[1].Add(1)
		time.Sleep(5 * time.Millisecond)
		return nil
	}})
	p := op.call(t, "p")
	if n := len(op.reg.List()); n != 2 {
		t.Fatalf("%d instances, want 2", n)
	}
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 10 {
				if _, err := p.EmptyCall(ctxTimeout(t, 5*time.Second), &testgrpc.Empty{}); err != nil {
					t.Error(err)
				}
			}
		})
	}
	wg.Wait()
	if calls[0].Load() == 0 || calls[1].Load() == 0 {
		t.Fatalf("calls per instance %d and %d: want both used", calls[0].Load(), calls[1].Load())
	}
	// One instance leaves; the other keeps serving.
	a.Close()
	for range 10 {
		if _, err := p.EmptyCall(ctxTimeout(t, 5*time.Second), &testgrpc.Empty{}); err != nil {
			t.Fatal(err)
		}
	}
	if n := len(op.reg.List()); n != 1 {
		t.Fatalf("%d instances after one left, want 1", n)
	}
}

func TestRegistrationPolicy(t *testing.T) {
	op := startOperator(t, server.WithRegistrationPolicy(func(_ context.Context, _ server.Identity, r server.Registration) error {
		if r.Name == "forbidden" {
			return status.Error(codes.PermissionDenied, "name not allowed")
		}
		return nil
	}))
	op.plugin(t, "allowed", &testService{})
	c, err := client.New(context.Background(), "forbidden", op.target, "v1", &testgrpc.TestService_ServiceDesc, &testService{},
		client.WithBackoff(fastBackoff))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	err = c.Ready(ctxTimeout(t, 500*time.Millisecond))
	if err == nil || !strings.Contains(err.Error(), "name not allowed") {
		t.Fatalf("Ready: %v, want the refusal", err)
	}
	if _, err := op.reg.Get("forbidden"); !errors.Is(err, registry.ErrNotFound) {
		t.Fatalf("Get(forbidden): %v", err)
	}
	if _, err := op.call(t, "allowed").EmptyCall(ctxTimeout(t, 5*time.Second), &testgrpc.Empty{}); err != nil {
		t.Fatal(err)
	}
}

func TestWatchAndWaitForReady(t *testing.T) {
	op := startOperator(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	events := op.reg.Watch(ctx)

	// A call made before the plugin exists waits for it.
	errc := make(chan error, 1)
	go func() {
		_, err := testgrpc.NewTestServiceClient(op.reg.Plugin("late")).EmptyCall(ctxTimeout(t, 10*time.Second), &testgrpc.Empty{}, grpc.WaitForReady(true))
		errc <- err
	}()
	// Without WaitForReady it fails at once.
	_, err := testgrpc.NewTestServiceClient(op.reg.Plugin("late")).EmptyCall(ctxTimeout(t, 10*time.Second), &testgrpc.Empty{})
	wantCode(t, err, codes.Unavailable)

	c := op.plugin(t, "late", &testService{})
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	ev := <-events
	if ev.Type != registry.Registered || ev.Instance.Name != "late" || ev.Instance.ID != c.InstanceID() {
		t.Fatalf("event %+v, want Registered late/%s", ev, c.InstanceID())
	}
	c.Close()
	ev = <-events
	if ev.Type != registry.Unregistered || ev.Instance.Name != "late" {
		t.Fatalf("event %+v, want Unregistered late", ev)
	}
}

func TestPluginCloseDrains(t *testing.T) {
	op := startOperator(t)
	started := make(chan struct{}, 1)
	release := make(chan struct{})
	c := op.plugin(t, "p", &testService{OnEmpty: blocker(started, release)})
	call := op.call(t, "p")
	errc := make(chan error, 1)
	go func() {
		_, err := call.EmptyCall(ctxTimeout(t, 10*time.Second), &testgrpc.Empty{})
		errc <- err
	}()
	<-started
	closed := make(chan struct{})
	go func() {
		c.Close()
		close(closed)
	}()
	// Once draining, the instance takes no new calls.
	deadline := time.Now().Add(5 * time.Second)
	for {
		_, err := call.UnaryCall(ctxTimeout(t, time.Second), &testgrpc.SimpleRequest{})
		if status.Code(err) == codes.Unavailable {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("calls still accepted while draining: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	close(release)
	if err := <-errc; err != nil {
		t.Fatalf("call in flight during drain: %v", err)
	}
	<-closed
	if _, err := op.reg.Get("p"); !errors.Is(err, registry.ErrNotFound) {
		t.Fatalf("Get after Close: %v", err)
	}
}

// TestPluginLostMidCall: a plugin whose connection breaks in the middle of
// a call (its process killed) fails the call with UNAVAILABLE saying that
// the plugin's connection was lost, not "context canceled", which would
// read as the caller's own cancellation.
func TestPluginLostMidCall(t *testing.T) {
	fr, errc := heldCallThroughFreezer(t, startOperator(t))
	fr.close() // the connection breaks, as when the plugin's process dies
	err := <-errc
	wantCode(t, err, codes.Unavailable)
	if msg := status.Convert(err).Message(); !strings.Contains(msg, "connection to the plugin lost") || strings.Contains(msg, "context canceled") {
		t.Fatalf("call failed with %q, want it to say the plugin's connection was lost", msg)
	}
}
