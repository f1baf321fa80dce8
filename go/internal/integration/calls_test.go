package integration_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/guilhem/operator-plugin-framework/go/client"
	"github.com/guilhem/operator-plugin-framework/go/server"
)

func TestUnary(t *testing.T) {
	op := startOperator(t)
	op.plugin(t, "p", &testService{})
	c := op.call(t, "p")
	resp, err := c.UnaryCall(ctxTimeout(t, 5*time.Second), &testgrpc.SimpleRequest{ResponseSize: 64})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(resp.GetPayload().GetBody(), payload(64).Body) {
		t.Fatalf("payload %v", resp.GetPayload().GetBody())
	}
	// An empty message both ways.
	if _, err := c.EmptyCall(ctxTimeout(t, 5*time.Second), &testgrpc.Empty{}); err != nil {
		t.Fatal(err)
	}
}

func TestServerStreaming(t *testing.T) {
	op := startOperator(t)
	op.plugin(t, "p", &testService{})
	c := op.call(t, "p")
	for _, want := range [][]int32{{}, {0}, {1, 10, 100, 1000, 100000}} {
		stream, err := c.StreamingOutputCall(ctxTimeout(t, 5*time.Second), &testgrpc.StreamingOutputCallRequest{ResponseParameters: sizes(want...)})
		if err != nil {
			t.Fatal(err)
		}
		var got []int32
		for {
			resp, err := stream.Recv()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			got = append(got, int32(len(resp.GetPayload().GetBody())))
		}
		if len(got) != len(want) {
			t.Fatalf("got %d messages %v, want %v", len(got), got, want)
		}
		for i := range got {
			if got[i] != want[i] {
				t.Fatalf("message %d: size %d, want %d", i, got[i], want[i])
			}
		}
	}
}

func TestServerStreamingErrorMidStream(t *testing.T) {
	op := startOperator(t)
	op.plugin(t, "p", &testService{})
	c := op.call(t, "p")
	stream := must[testgrpc.TestService_StreamingOutputCallClient](t)(c.StreamingOutputCall(ctxTimeout(t, 5*time.Second), &testgrpc.StreamingOutputCallRequest{
		ResponseParameters: sizes(1, 2),
		ResponseStatus:     &testgrpc.EchoStatus{Code: int32(codes.Aborted), Message: "stop"},
	}))
	for range 2 {
		if _, err := stream.Recv(); err != nil {
			t.Fatal(err)
		}
	}
	_, err := stream.Recv()
	wantCode(t, err, codes.Aborted)
}

func TestClientStreaming(t *testing.T) {
	op := startOperator(t)
	op.plugin(t, "p", &testService{})
	c := op.call(t, "p")
	for _, n := range []int{0, 1, 50} {
		stream := must[testgrpc.TestService_StreamingInputCallClient](t)(c.StreamingInputCall(ctxTimeout(t, 5*time.Second)))
		for i := range n {
			if err := stream.Send(&testgrpc.StreamingInputCallRequest{Payload: payload(int32(i))}); err != nil {
				t.Fatal(err)
			}
		}
		resp, err := stream.CloseAndRecv()
		if err != nil {
			t.Fatal(err)
		}
		if want := int32(n * (n - 1) / 2); resp.AggregatedPayloadSize != want {
			t.Fatalf("aggregated %d, want %d", resp.AggregatedPayloadSize, want)
		}
	}
}

func TestBidiStreaming(t *testing.T) {
	op := startOperator(t)
	op.plugin(t, "p", &testService{})
	c := op.call(t, "p")
	stream := must[testgrpc.TestService_FullDuplexCallClient](t)(c.FullDuplexCall(ctxTimeout(t, 5*time.Second)))
	for i := range 20 {
		if err := stream.Send(&testgrpc.StreamingOutputCallRequest{ResponseParameters: sizes(int32(i), int32(i+1))}); err != nil {
			t.Fatal(err)
		}
		for j := range 2 {
			resp, err := stream.Recv()
			if err != nil {
				t.Fatal(err)
			}
			if got := len(resp.GetPayload().GetBody()); got != i+j {
				t.Fatalf("size %d, want %d", got, i+j)
			}
		}
	}
	if err := stream.CloseSend(); err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Recv(); !errors.Is(err, io.EOF) {
		t.Fatalf("got %v, want EOF", err)
	}

	// Zero messages, and an error in the middle.
	stream = must[testgrpc.TestService_FullDuplexCallClient](t)(c.FullDuplexCall(ctxTimeout(t, 5*time.Second)))
	stream.CloseSend()
	if _, err := stream.Recv(); !errors.Is(err, io.EOF) {
		t.Fatalf("got %v, want EOF", err)
	}
	stream = must[testgrpc.TestService_FullDuplexCallClient](t)(c.FullDuplexCall(ctxTimeout(t, 5*time.Second)))
	stream.Send(&testgrpc.StreamingOutputCallRequest{ResponseParameters: sizes(3)})
	stream.Send(&testgrpc.StreamingOutputCallRequest{ResponseStatus: &testgrpc.EchoStatus{Code: int32(codes.DataLoss), Message: "gone"}})
	if _, err := stream.Recv(); err != nil {
		t.Fatal(err)
	}
	_, err := stream.Recv()
	wantCode(t, err, codes.DataLoss)
}

func TestMetadata(t *testing.T) {
	op := startOperator(t)
	op.plugin(t, "p", &testService{})
	c := op.call(t, "p")
	binary := string([]byte{0, 1, 2, 0xfe, 0xff})
	ctx := metadata.AppendToOutgoingContext(ctxTimeout(t, 5*time.Second),
		"x-echo-text", "hello", "x-echo-text", "again",
		"x-echo-data-bin", binary,
		"x-trail-data-bin", binary,
		"x-trail-text", "bye")
	var header, trailer metadata.MD
	if _, err := c.UnaryCall(ctx, &testgrpc.SimpleRequest{}, grpc.Header(&header), grpc.Trailer(&trailer)); err != nil {
		t.Fatal(err)
	}
	check := func(md metadata.MD, key string, want ...string) {
		t.Helper()
		got := md.Get(key)
		if len(got) != len(want) {
			t.Fatalf("%s = %q, want %q (all: %v)", key, got, want, md)
		}
		for i := range got {
			if got[i] != want[i] {
				t.Fatalf("%s = %q, want %q", key, got, want)
			}
		}
	}
	check(header, "x-echo-text", "hello", "again")
	check(header, "x-echo-data-bin", binary)
	check(trailer, "x-trail-data-bin", binary)
	check(trailer, "x-trail-text", "bye")

	// The same through a stream's Header and Trailer methods.
	// (Headers set with grpc.SetHeader leave with the first message or the
	// end of the handler, as in grpc-go.)
	stream := must[testgrpc.TestService_FullDuplexCallClient](t)(c.FullDuplexCall(ctx))
	stream.CloseSend()
	h, err := stream.Header()
	if err != nil {
		t.Fatal(err)
	}
	check(h, "x-echo-data-bin", binary)
	if _, err := stream.Recv(); !errors.Is(err, io.EOF) {
		t.Fatal(err)
	}
	check(stream.Trailer(), "x-trail-text", "bye")
}

func TestDeadlineReachesHandler(t *testing.T) {
	op := startOperator(t)
	seen := make(chan time.Duration, 1)
	op.plugin(t, "p", &testService{OnEmpty: func(ctx context.Context) error {
		dl, ok := ctx.Deadline()
		if !ok {
			seen <- -1
			return nil
		}
		seen <- time.Until(dl)
		<-ctx.Done()
		return ctx.Err()
	}})
	c := op.call(t, "p")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	start := time.Now()
	_, err := c.EmptyCall(ctx, &testgrpc.Empty{})
	wantCode(t, err, codes.DeadlineExceeded)
	if left := <-seen; left <= time.Second || left > 2*time.Second {
		t.Fatalf("handler saw %v left, want about 2s", left)
	}
	if el := time.Since(start); el > 3*time.Second {
		t.Fatalf("call took %v", el)
	}
}

func TestCancelReachesHandler(t *testing.T) {
	op := startOperator(t)
	started := make(chan struct{})
	cancelled := make(chan error, 1)
	op.plugin(t, "p", &testService{OnEmpty: func(ctx context.Context) error {
		close(started)
		select {
		case <-ctx.Done():
			cancelled <- ctx.Err()
		case <-time.After(10 * time.Second):
			cancelled <- nil
		}
		return ctx.Err()
	}})
	c := op.call(t, "p")
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() {
		_, err := c.EmptyCall(ctx, &testgrpc.Empty{})
		errc <- err
	}()
	<-started
	cancel()
	wantCode(t, <-errc, codes.Canceled)
	if err := <-cancelled; !errors.Is(err, context.Canceled) {
		t.Fatalf("handler context: %v, want Canceled", err)
	}
}

func TestStatusRoundTrip(t *testing.T) {
	op := startOperator(t)
	op.plugin(t, "p", &testService{})
	c := op.call(t, "p")
	for code := codes.Canceled; code <= codes.Unauthenticated; code++ {
		_, err := c.UnaryCall(ctxTimeout(t, 5*time.Second), &testgrpc.SimpleRequest{
			ResponseStatus: &testgrpc.EchoStatus{Code: int32(code), Message: "message for " + code.String()},
		})
		st := status.Convert(err)
		if st.Code() != code || st.Message() != "message for "+code.String() {
			t.Fatalf("got %v %q, want %v", st.Code(), st.Message(), code)
		}
		if len(st.Details()) != 1 {
			t.Fatalf("%v: details %v", code, st.Details())
		}
		info, ok := st.Details()[0].(*errdetails.ErrorInfo)
		if !ok || info.Reason != "TEST" || info.Metadata["k"] != "v" {
			t.Fatalf("%v: detail %v", code, st.Details()[0])
		}
	}
}

func TestUnimplemented(t *testing.T) {
	op := startOperator(t)
	op.plugin(t, "p", &testService{})
	p, err := op.reg.Get("p")
	if err != nil {
		t.Fatal(err)
	}
	_, err = testgrpc.NewUnimplementedServiceClient(p).UnimplementedCall(ctxTimeout(t, 5*time.Second), &testgrpc.Empty{})
	wantCode(t, err, codes.Unimplemented)
	_, err = testgrpc.NewTestServiceClient(p).UnimplementedCall(ctxTimeout(t, 5*time.Second), &testgrpc.Empty{})
	wantCode(t, err, codes.Unimplemented)
	// The tunnel still works.
	if _, err := testgrpc.NewTestServiceClient(p).EmptyCall(ctxTimeout(t, 5*time.Second), &testgrpc.Empty{}); err != nil {
		t.Fatal(err)
	}
}

func TestHandlerPanic(t *testing.T) {
	op := startOperator(t)
	op.plugin(t, "p", &testService{OnEmpty: func(context.Context) error { panic("boom") }})
	c := op.call(t, "p")
	_, err := c.EmptyCall(ctxTimeout(t, 5*time.Second), &testgrpc.Empty{})
	wantCode(t, err, codes.Internal)
	if _, err := c.UnaryCall(ctxTimeout(t, 5*time.Second), &testgrpc.SimpleRequest{}); err != nil {
		t.Fatal(err)
	}
}

func TestLargeMessages(t *testing.T) {
	const big = 16 << 20
	op := startOperator(t, server.WithMaxMessageSize(big+1024))
	op.plugin(t, "p", &testService{}, client.WithMaxMessageSize(big+1024))
	c := op.call(t, "p")
	// 16 MiB each way.
	resp, err := c.UnaryCall(ctxTimeout(t, 20*time.Second), &testgrpc.SimpleRequest{ResponseSize: big, Payload: payload(big)})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(resp.Payload.Body, payload(big).Body) {
		t.Fatal("16 MiB payload corrupted")
	}
}

func TestOversizeMessage(t *testing.T) {
	op := startOperator(t, server.WithMaxMessageSize(1<<20))
	op.plugin(t, "p", &testService{}, client.WithMaxMessageSize(1<<20))
	c := op.call(t, "p")
	// Request over the plugin's limit: refused before it leaves.
	_, err := c.UnaryCall(ctxTimeout(t, 5*time.Second), &testgrpc.SimpleRequest{Payload: payload(2 << 20)})
	wantCode(t, err, codes.ResourceExhausted)
	// Response over the operator's limit.
	_, err = c.UnaryCall(ctxTimeout(t, 5*time.Second), &testgrpc.SimpleRequest{ResponseSize: 2 << 20})
	wantCode(t, err, codes.ResourceExhausted)
	// A per-call limit lower than the tunnel's.
	_, err = c.UnaryCall(ctxTimeout(t, 5*time.Second), &testgrpc.SimpleRequest{ResponseSize: 1000}, grpc.MaxCallRecvMsgSize(100))
	wantCode(t, err, codes.ResourceExhausted)
	// Only those calls failed.
	if _, err := c.UnaryCall(ctxTimeout(t, 5*time.Second), &testgrpc.SimpleRequest{ResponseSize: 1000}); err != nil {
		t.Fatal(err)
	}
}

func TestManyConcurrentCalls(t *testing.T) {
	op := startOperator(t)
	op.plugin(t, "p", &testService{})
	c := op.call(t, "p")
	var wg sync.WaitGroup
	errs := make(chan error, 1000)
	for i := range 1000 {
		wg.Go(func() {
			resp, err := c.UnaryCall(ctxTimeout(t, 30*time.Second), &testgrpc.SimpleRequest{ResponseSize: int32(i)})
			if err == nil && len(resp.GetPayload().GetBody()) != i {
				err = errors.New("wrong payload size")
			}
			if err != nil {
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

func TestStalledConsumerDoesNotBlockOthers(t *testing.T) {
	op := startOperator(t, server.WithInitialWindowSize(64<<10))
	op.plugin(t, "p", &testService{})
	c := op.call(t, "p")
	// A stream of 64 messages of 64 KiB that nobody reads: the plugin fills
	// the window and then waits.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if _, err := c.StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{ResponseParameters: sizes(repeat(64<<10, 64)...)}); err != nil {
		t.Fatal(err)
	}
	// Meanwhile other calls, including large ones, go through.
	for range 20 {
		if _, err := c.UnaryCall(ctxTimeout(t, 5*time.Second), &testgrpc.SimpleRequest{ResponseSize: 256 << 10}); err != nil {
			t.Fatal(err)
		}
	}
}

func repeat(v int32, n int) []int32 {
	out := make([]int32, n)
	for i := range out {
		out[i] = v
	}
	return out
}

func TestCallErrorsStayLocal(t *testing.T) {
	op := startOperator(t)
	c := op.plugin(t, "p", &testService{})
	call := op.call(t, "p")
	// Metadata larger than the plugin's batch limit fails the call, not the tunnel.
	big := metadata.AppendToOutgoingContext(ctxTimeout(t, 5*time.Second), "x-big", strings.Repeat("x", 5<<20))
	_, err := call.UnaryCall(big, &testgrpc.SimpleRequest{})
	wantCode(t, err, codes.ResourceExhausted)
	// Metadata no gRPC peer would accept fails before it leaves.
	bad := metadata.NewOutgoingContext(ctxTimeout(t, 5*time.Second), metadata.MD{"bad key": {"v"}})
	_, err = call.UnaryCall(bad, &testgrpc.SimpleRequest{})
	wantCode(t, err, codes.Internal)
	// The handler decodes protobuf; another codec is refused.
	_, err = call.UnaryCall(ctxTimeout(t, 5*time.Second), &testgrpc.SimpleRequest{}, grpc.ForceCodecV2(jsonCodec{}))
	wantCode(t, err, codes.Internal)
	if _, err := call.UnaryCall(ctxTimeout(t, 5*time.Second), &testgrpc.SimpleRequest{}); err != nil {
		t.Fatal(err)
	}
	if got := op.reg.List(); len(got) != 1 || got[0].ID != c.InstanceID() {
		t.Fatalf("instances %v, want the first one still there", got)
	}
}

type jsonCodec struct{ encoding.CodecV2 }

func (jsonCodec) Name() string { return "json" }

func TestDeadlineCountsTheWaitForASlot(t *testing.T) {
	op := startOperator(t)
	release := make(chan struct{})
	seen := make(chan time.Duration, 2)
	op.plugin(t, "p", &testService{OnEmpty: func(ctx context.Context) error {
		dl, _ := ctx.Deadline()
		seen <- time.Until(dl)
		<-release
		return nil
	}}, client.WithMaxConcurrentStreams(1))
	c := op.call(t, "p")
	errc := make(chan error, 2)
	go func() {
		_, err := c.EmptyCall(ctxTimeout(t, 10*time.Second), &testgrpc.Empty{})
		errc <- err
	}()
	<-seen
	go func() {
		// Waits for the only slot, 300 ms.
		_, err := c.EmptyCall(ctxTimeout(t, 2*time.Second), &testgrpc.Empty{})
		errc <- err
	}()
	time.Sleep(300 * time.Millisecond)
	close(release)
	if left := <-seen; left > 1800*time.Millisecond {
		t.Fatalf("second handler saw %v left, want the time spent waiting deducted", left)
	}
	for range 2 {
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
	}
}

func TestHeadersSurviveAFailedSend(t *testing.T) {
	op := startOperator(t, server.WithMaxMessageSize(1<<20))
	op.plugin(t, "p", &testService{})
	c := op.call(t, "p")
	ctx := metadata.AppendToOutgoingContext(ctxTimeout(t, 5*time.Second), "x-echo-kept", "yes")
	stream := must[testgrpc.TestService_StreamingOutputCallClient](t)(c.StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{ResponseParameters: sizes(2 << 20)}))
	_, err := stream.Recv()
	wantCode(t, err, codes.ResourceExhausted)
	if h, _ := stream.Header(); len(h.Get("x-echo-kept")) != 1 {
		t.Fatalf("headers %v, want x-echo-kept", h)
	}
}

// TestServerStreamEndedBeforeRequest: a server-streaming call that the
// plugin ends before its request is sent (an unknown method) reports the
// plugin's status, as on a *grpc.ClientConn, whose one SendMsg of the
// generated code returns nil rather than io.EOF.
func TestServerStreamEndedBeforeRequest(t *testing.T) {
	o := startOperator(t)
	o.plugin(t, "p", &testService{})
	p, err := o.reg.Get("p")
	if err != nil {
		t.Fatal(err)
	}
	desc := &grpc.StreamDesc{ServerStreams: true}
	s, err := p.NewStream(ctxTimeout(t, 5*time.Second), desc, "/grpc.testing.TestService/NoSuchMethod")
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond) // the plugin's UNIMPLEMENTED arrives first
	if err := s.SendMsg(&testgrpc.Empty{}); err != nil {
		t.Fatalf("SendMsg: %v, want nil (the status is RecvMsg's)", err)
	}
	wantCode(t, s.RecvMsg(&testgrpc.Empty{}), codes.Unimplemented)
}
