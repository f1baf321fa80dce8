package registry

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func wantStatus(t *testing.T, err error, code codes.Code, msg string) {
	t.Helper()
	if st := status.Convert(err); st.Code() != code || st.Message() != msg {
		t.Fatalf("error %v, want %s %q", err, code, msg)
	}
}

// A rolling upgrade: the new version adds service "t"; calls for it go
// only to the new instance, whatever the load.
func TestRoutesByService(t *testing.T) {
	r := New()
	var calls []string
	old := &conn{name: "old", accepting: true, calls: &calls}
	young := &conn{name: "young", accepting: true, calls: &calls}
	r.Add(Instance{ID: "1", Name: "p", Services: []string{"s"}}, old)
	r.Add(Instance{ID: "2", Name: "p", Services: []string{"s", "t"}}, young)
	p := r.Plugin("p")
	ctx := context.Background()
	young.inFlight = 5
	for _, m := range []string{"/s/m", "/t/m", "/t/n"} {
		if err := p.Invoke(ctx, m, nil, nil); err != nil {
			t.Fatal(err)
		}
	}
	if want := "[old young young]"; fmt.Sprint(calls) != want {
		t.Fatalf("calls went to %v, want %v", calls, want)
	}
	wantStatus(t, p.Invoke(ctx, "/u/m", nil, nil), codes.Unimplemented, `plugin "p" has no instance serving u`)

	young.accepting = false // draining: nobody else serves t
	wantStatus(t, p.Invoke(ctx, "/t/m", nil, nil), codes.Unavailable, `plugin "p" is draining`)
	old.accepting = false
	wantStatus(t, p.Invoke(ctx, "/s/m", nil, nil), codes.Unavailable, `plugin "p" is draining`)
}

func TestNotConnectedSaysWhyTheLastInstanceLeft(t *testing.T) {
	r := New()
	var calls []string
	p := r.Plugin("p")
	wantStatus(t, p.Invoke(context.Background(), "/s/m", nil, nil), codes.Unavailable, `plugin "p" is not connected`)
	remove := r.Add(Instance{ID: "p-7", Name: "p", Services: svc}, &conn{accepting: true, calls: &calls,
		err: status.Error(codes.Unavailable, "plugin connection lost: heartbeat timeout")})
	remove()
	wantStatus(t, p.Invoke(context.Background(), "/s/m", nil, nil), codes.Unavailable,
		`plugin "p" is not connected (its last instance, p-7, left: plugin connection lost: heartbeat timeout)`)
	// A clean departure says so; a new registration forgets the old one.
	r.Add(Instance{ID: "p-8", Name: "p", Services: svc}, &conn{accepting: true, calls: &calls})()
	wantStatus(t, p.Invoke(context.Background(), "/s/m", nil, nil), codes.Unavailable,
		`plugin "p" is not connected (its last instance, p-8, left: drained)`)
	r.Add(Instance{ID: "p-9", Name: "p", Services: svc}, &conn{accepting: false, calls: &calls})
	wantStatus(t, p.Invoke(context.Background(), "/s/m", nil, nil), codes.Unavailable, `plugin "p" is draining`)
}

func TestFilters(t *testing.T) {
	r := New()
	var calls []string
	r.Add(Instance{ID: "1", Name: "p", Version: "v1", Services: svc, Labels: map[string]string{"zone": "a"}}, &conn{name: "v1", accepting: true, calls: &calls})
	r.Add(Instance{ID: "2", Name: "p", Version: "v2", Services: svc, Labels: map[string]string{"zone": "b"}}, &conn{name: "v2", accepting: true, calls: &calls})
	ctx := context.Background()
	for _, o := range []Option{WithVersion("v1"), WithLabels(map[string]string{"zone": "a"})} {
		p, err := r.Get("p", o)
		if err != nil {
			t.Fatal(err)
		}
		if in := p.Instances(); len(in) != 1 || in[0].ID != "1" {
			t.Fatalf("Instances %v, want only 1", in)
		}
		if err := p.Invoke(ctx, "/s/m", nil, nil); err != nil {
			t.Fatal(err)
		}
	}
	if want := "[v1 v1]"; fmt.Sprint(calls) != want {
		t.Fatalf("calls went to %v, want %v", calls, want)
	}
	if _, err := r.Get("p", WithVersion("v3")); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get with no matching instance: %v", err)
	}
	p := r.Plugin("p", WithVersion("v1"), WithLabels(map[string]string{"zone": "b"}))
	wantStatus(t, p.Invoke(ctx, "/s/m", nil, nil), codes.Unavailable, `plugin "p" has no instance with version "v1" and labels map[zone:b]`)
}

// With wait-for-ready a call waits for an instance that serves its
// service, not for any instance.
func TestWaitForReadyWaitsForTheService(t *testing.T) {
	r := New()
	var calls []string
	r.Add(Instance{ID: "1", Name: "p", Services: []string{"s"}}, &conn{name: "old", accepting: true, calls: &calls})
	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		done <- r.Plugin("p").Invoke(ctx, "/t/m", nil, nil, grpc.WaitForReady(true))
	}()
	select {
	case err := <-done:
		t.Fatalf("the call ended (%v) before an instance serving t came", err)
	case <-time.After(100 * time.Millisecond):
	}
	r.Add(Instance{ID: "2", Name: "p", Services: []string{"s", "t"}}, &conn{name: "young", accepting: true, calls: &calls})
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if want := "[young]"; fmt.Sprint(calls) != want {
		t.Fatalf("calls went to %v, want %v", calls, want)
	}

	// Wait's error says what it waited for.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	_, err := r.Wait(ctx, "absent")
	wantStatus(t, err, codes.DeadlineExceeded, `context deadline exceeded while waiting for an instance: plugin "absent" is not connected`)
}

func TestCallOptionsTimeoutAndInterceptors(t *testing.T) {
	r := New(
		WithDefaultTimeout(time.Minute),
		WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(1)),
		WithUnaryInterceptor(tag("registry")),
	)
	var calls []string
	c := &conn{accepting: true, calls: &calls}
	r.Add(Instance{ID: "1", Name: "p", Services: svc}, c)
	var order []string
	ctx := context.WithValue(context.Background(), orderKey{}, &order)
	p := r.Plugin("p", WithUnaryInterceptor(tag("provider")))
	if err := p.Invoke(ctx, "/s/m", nil, nil, grpc.MaxCallSendMsgSize(2)); err != nil {
		t.Fatal(err)
	}
	if want := "[registry provider]"; fmt.Sprint(order) != want {
		t.Fatalf("interceptors ran in order %v, want %v", order, want)
	}
	dl, ok := c.ctx.Deadline()
	if !ok || time.Until(dl) < 50*time.Second {
		t.Fatalf("a call without deadline got deadline %v (%v), want about a minute", dl, ok)
	}
	if len(c.opts) != 2 || fmt.Sprintf("%T", c.opts[0]) != "grpc.MaxRecvMsgSizeCallOption" {
		t.Fatalf("call options %#v, want the default first, then the call's", c.opts)
	}
	// A deadline of the caller's own is kept.
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	if err := p.Invoke(ctx, "/s/m", nil, nil); err != nil {
		t.Fatal(err)
	}
	if dl, _ := c.ctx.Deadline(); time.Until(dl) > 2*time.Second {
		t.Fatalf("the caller's 1s deadline became %v", time.Until(dl))
	}
}

type orderKey struct{}

func tag(name string) grpc.UnaryClientInterceptor {
	return func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		order := ctx.Value(orderKey{}).(*[]string)
		*order = append(*order, name)
		return invoker(ctx, method, req, reply, cc, opts...)
	}
}

func TestNewProviderCallsItsConnection(t *testing.T) {
	var calls []string
	c := &conn{name: "fake", calls: &calls}
	var order []string
	ctx := context.WithValue(context.Background(), orderKey{}, &order)
	p := NewProvider("p", c, WithUnaryInterceptor(tag("fake")))
	if err := p.Invoke(ctx, "/any.Service/M", nil, nil); err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(calls) != "[fake]" || fmt.Sprint(order) != "[fake]" || p.Name() != "p" || p.Instances() != nil {
		t.Fatalf("calls %v, interceptors %v, name %q", calls, order, p.Name())
	}
}

func TestServiceOfMethod(t *testing.T) {
	for method, want := range map[string]string{
		"/demo.v1.ValidatorService/Validate": "demo.v1.ValidatorService",
		"/s/m":                               "s",
		"nomethod":                           "",
	} {
		if got := service(method); got != want {
			t.Errorf("service(%q) = %q, want %q", method, got, want)
		}
	}
}

// endedStream is a stream whose handler already ended the call.
type endedStream struct{ grpc.ClientStream }

func (endedStream) RecvMsg(any) error { return status.Error(codes.NotFound, "gone") }

type endedConn struct{ conn }

func (endedConn) NewStream(context.Context, *grpc.StreamDesc, string, ...grpc.CallOption) (grpc.ClientStream, error) {
	return endedStream{}, nil
}

func tagStream(name string) grpc.StreamClientInterceptor {
	return func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
		order := ctx.Value(orderKey{}).(*[]string)
		*order = append(*order, name)
		return streamer(ctx, desc, cc, method, opts...)
	}
}

func TestStreamInterceptorsChain(t *testing.T) {
	r := New(WithStreamInterceptor(tagStream("registry")))
	var calls []string
	r.Add(Instance{ID: "1", Name: "p", Services: svc}, &endedConn{conn{name: "c", accepting: true, calls: &calls}})
	var order []string
	ctx := context.WithValue(context.Background(), orderKey{}, &order)
	s, err := r.Plugin("p", WithStreamInterceptor(tagStream("a"), tagStream("b"))).NewStream(ctx, &grpc.StreamDesc{ServerStreams: true}, "/s/m")
	if err != nil {
		t.Fatal(err)
	}
	wantStatus(t, s.RecvMsg(nil), codes.NotFound, "gone")
	if want := "[registry a b]"; fmt.Sprint(order) != want {
		t.Fatalf("stream interceptors ran in order %v, want %v", order, want)
	}
}
