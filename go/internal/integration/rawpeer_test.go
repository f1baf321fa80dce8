package integration_test

import (
	"context"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/encoding/proto"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"
	protoenc "google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/guilhem/operator-plugin-framework/go/client"
	pb "github.com/guilhem/operator-plugin-framework/go/gen/pluginframework/v1"
	"github.com/guilhem/operator-plugin-framework/go/internal/tunnel"
	"github.com/guilhem/operator-plugin-framework/go/server"
)

// Tests where one side of the tunnel is a hand-driven peer that sends raw
// frames, to check how the real other side treats bad input.

// rawPeer is one end of a Connect stream driven frame by frame.
type rawPeer struct {
	t      testing.TB
	send   func([]*pb.Frame) error
	frames chan *pb.Frame
	ended  chan error // the stream's end, once
}

func newRawPeer(t testing.TB, send func([]*pb.Frame) error, recv func() ([]*pb.Frame, error)) *rawPeer {
	p := &rawPeer{t: t, send: send, frames: make(chan *pb.Frame, 4096), ended: make(chan error, 1)}
	go func() {
		for {
			fs, err := recv()
			if err != nil {
				p.ended <- err
				close(p.frames)
				return
			}
			for _, f := range fs {
				p.frames <- f
			}
		}
	}()
	return p
}

func (p *rawPeer) sendFrames(fs ...*pb.Frame) {
	p.t.Helper()
	if err := p.send(fs); err != nil {
		p.t.Fatalf("send: %v", err)
	}
}

// expect returns the first frame that match accepts, skipping heartbeats
// and anything else, within 5 s.
func (p *rawPeer) expect(what string, match func(*pb.Frame) bool) *pb.Frame {
	p.t.Helper()
	timeout := time.After(5 * time.Second)
	for {
		select {
		case f, ok := <-p.frames:
			if !ok {
				p.t.Fatalf("waiting for %s: stream ended: %v", what, <-p.ended)
			}
			if match(f) {
				return f
			}
		case <-timeout:
			p.t.Fatalf("no %s within 5s", what)
		}
	}
}

// expectEnd waits for the stream to end and returns its error.
func (p *rawPeer) expectEnd() error {
	p.t.Helper()
	for {
		select {
		case _, ok := <-p.frames:
			if !ok {
				return <-p.ended
			}
		case <-time.After(5 * time.Second):
			p.t.Fatal("stream did not end within 5s")
		}
	}
}

// alive checks that the peer still answers a ping.
func (p *rawPeer) alive(nonce uint64) {
	p.t.Helper()
	p.sendFrames(&pb.Frame{Kind: &pb.Frame_Ping{Ping: &pb.Ping{Nonce: nonce}}})
	p.expect("pong", func(f *pb.Frame) bool { return f.GetPong() != nil && f.GetPong().Nonce == nonce })
}

func on(id uint64, kind string) func(*pb.Frame) bool {
	return func(f *pb.Frame) bool {
		if f.GetStreamId() != id {
			return false
		}
		switch kind {
		case "close":
			return f.GetClose() != nil
		case "cancel":
			return f.GetCancel() != nil
		case "open":
			return f.GetOpen() != nil
		case "halfclose":
			return f.GetHalfClose() != nil
		}
		return false
	}
}

func wantStatus(t testing.TB, got *status.Status, code codes.Code, substr string) {
	t.Helper()
	if got.Code() != code || !strings.Contains(got.Message(), substr) {
		t.Fatalf("status %v %q, want %v containing %q", got.Code(), got.Message(), code, substr)
	}
}

func hello() *pb.Frame { return helloWith(&pb.Settings{}) }

func helloWith(s *pb.Settings) *pb.Frame {
	return &pb.Frame{Kind: &pb.Frame_Hello{Hello: &pb.Hello{MinVersion: tunnel.MinVersion, MaxVersion: tunnel.MaxVersion, Settings: s}}}
}

func register(name string) *pb.Frame {
	return &pb.Frame{Kind: &pb.Frame_Register{Register: &pb.Register{Name: name, Version: "raw", Services: []string{"grpc.testing.TestService"}}}}
}

func openF(id uint64, method string) *pb.Frame {
	return &pb.Frame{StreamId: id, Kind: &pb.Frame_Open{Open: &pb.StreamOpen{Method: method, Timeout: durationpb.New(10 * time.Second)}}}
}

func msgF(id uint64, size uint32, data []byte) *pb.Frame {
	return &pb.Frame{StreamId: id, Kind: &pb.Frame_Message{Message: &pb.StreamMessage{Size: size, Data: data}}}
}

func closeF(id uint64, st *status.Status) *pb.Frame {
	return &pb.Frame{StreamId: id, Kind: &pb.Frame_Close{Close: &pb.StreamClose{Status: st.Proto()}}}
}

func encode(t testing.TB, m protoenc.Message) []byte {
	b, err := protoenc.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// dialRawPlugin opens a Connect stream to the operator as a raw plugin.
func dialRawPlugin(t testing.TB, op *operator, opts ...grpc.CallOption) (*rawPeer, grpc.BidiStreamingClient[pb.ConnectRequest, pb.ConnectResponse]) {
	cc, err := grpc.NewClient(op.target, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	stream, err := pb.NewPluginFrameworkServiceClient(cc).Connect(ctx, opts...)
	if err != nil {
		t.Fatal(err)
	}
	p := newRawPeer(t,
		func(fs []*pb.Frame) error { return stream.Send(&pb.ConnectRequest{Frames: fs}) },
		func() ([]*pb.Frame, error) {
			m, err := stream.Recv()
			return m.GetFrames(), err
		})
	return p, stream
}

func registerRaw(t testing.TB, op *operator, name string) *rawPeer {
	p, _ := dialRawPlugin(t, op)
	p.sendFrames(hello(), register(name))
	p.expect("hello", func(f *pb.Frame) bool { return f.GetHello() != nil })
	p.expect("register ack", func(f *pb.Frame) bool { return f.GetRegisterAck() != nil })
	return p
}

func TestRawPluginCallBeforeRegistration(t *testing.T) {
	op := startOperator(t)
	// Any stream frame before registration ends the tunnel (spec 4.6).
	for _, f := range []*pb.Frame{openF(2, "/grpc.testing.TestService/EmptyCall"), msgF(1, 1, []byte{1}), closeF(1, status.New(codes.OK, ""))} {
		p, _ := dialRawPlugin(t, op)
		p.sendFrames(hello(), f)
		ga := p.expect("go-away", func(f *pb.Frame) bool { return f.GetGoAway() != nil })
		wantStatus(t, status.FromProto(ga.GetGoAway().Reason), codes.Internal, "before registration")
		if err := p.expectEnd(); status.Code(err) != codes.Internal {
			t.Fatalf("stream ended with %v, want INTERNAL", err)
		}
	}
	// The operator serves no calls in protocol version 2.
	p := registerRaw(t, op, "raw")
	p.sendFrames(openF(4, "/grpc.testing.TestService/EmptyCall"))
	f := p.expect("close of stream 4", on(4, "close"))
	wantStatus(t, status.FromProto(f.GetClose().Status), codes.Unimplemented, "serves no calls")
	p.alive(1)
}

// TestRawPluginBatchLimits: before registration the operator decodes no
// batch over 64 KiB, and no batch may hold more than 4,096 frames.
func TestRawPluginBatchLimits(t *testing.T) {
	op := startOperator(t, server.WithMaxBatchSize(4<<20)) // the protocol's default, above the server's

	p, _ := dialRawPlugin(t, op)
	big := register("raw")
	big.GetRegister().Labels = map[string]string{"pad": strings.Repeat("x", 70<<10)}
	p.sendFrames(hello(), big)
	ga := p.expect("go-away", func(f *pb.Frame) bool { return f.GetGoAway() != nil })
	wantStatus(t, status.FromProto(ga.GetGoAway().Reason), codes.ResourceExhausted, "before registration: the limit is 65536")
	p.expectEnd()

	p = registerRaw(t, op, "raw")
	pings := make([]*pb.Frame, 4097)
	for i := range pings {
		pings[i] = &pb.Frame{Kind: &pb.Frame_Ping{Ping: &pb.Ping{Nonce: uint64(i)}}}
	}
	p.sendFrames(pings[:4096]...) // at the limit: fine
	p.alive(1)
	p.sendFrames(pings...)
	ga = p.expect("go-away", func(f *pb.Frame) bool { return f.GetGoAway() != nil })
	wantStatus(t, status.FromProto(ga.GetGoAway().Reason), codes.ResourceExhausted, "more than 4096 frames")
	p.expectEnd()

	// After registration, the operator's own limit (4 MiB) applies.
	p = registerRaw(t, op, "raw")
	p.sendFrames(&pb.Frame{Kind: &pb.Frame_Pong{Pong: &pb.Pong{}}}, &pb.Frame{Kind: &pb.Frame_Register{Register: &pb.Register{Name: strings.Repeat("x", 1<<20)}}})
	ga = p.expect("go-away", func(f *pb.Frame) bool { return f.GetGoAway() != nil })
	wantStatus(t, status.FromProto(ga.GetGoAway().Reason), codes.Internal, "register out of order")
}

// TestRawPluginRegistrationLimits: every registration field is bounded.
func TestRawPluginRegistrationLimits(t *testing.T) {
	op := startOperator(t)
	many := func(n int) []string {
		out := make([]string, n)
		for i := range out {
			out[i] = fmt.Sprintf("svc.v1.S%d", i)
		}
		return out
	}
	labels := map[string]string{}
	for i := range 33 {
		labels[fmt.Sprint(i)] = "v"
	}
	for _, c := range []struct {
		reg  *pb.Register
		want string
	}{
		{&pb.Register{Name: "raw"}, "no service listed"},
		{&pb.Register{Name: "raw", Version: strings.Repeat("v", 129), Services: []string{"a.B"}}, "version is longer than 128"},
		{&pb.Register{Name: "raw", Services: many(65)}, "more than 64 services"},
		{&pb.Register{Name: "raw", Services: []string{strings.Repeat("s", 254)}}, "invalid service name"},
		{&pb.Register{Name: "raw", Services: []string{"a.B"}, Labels: labels}, "more than 32 labels"},
		{&pb.Register{Name: "raw", Services: []string{"a.B"}, Labels: map[string]string{"k": strings.Repeat("v", 257)}}, "invalid label"},
	} {
		p, _ := dialRawPlugin(t, op)
		p.sendFrames(hello(), &pb.Frame{Kind: &pb.Frame_Register{Register: c.reg}})
		rj := p.expect("reject", func(f *pb.Frame) bool { return f.GetRegisterReject() != nil })
		wantStatus(t, status.FromProto(rj.GetRegisterReject().Status), codes.InvalidArgument, c.want)
		if n := len(rj.GetRegisterReject().GetStatus().GetMessage()); n > 200 {
			t.Errorf("%s: the refusal quotes %d bytes", c.want, n)
		}
		p.expectEnd()
	}
}

// TestRawPluginEmptyMessagesCostCredit: every chunk costs 64 bytes of
// credit (spec 8.1), so empty messages cannot be queued without bound.
func TestRawPluginEmptyMessagesCostCredit(t *testing.T) {
	op := startOperator(t, server.WithInitialWindowSize(64<<10))
	p := registerRaw(t, op, "raw")
	c := op.call(t, "raw")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s, err := c.StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{})
	if err != nil {
		t.Fatal(err)
	}
	p.expect("open", on(1, "open"))
	// The caller reads nothing yet: 1,024 empty messages fill the 64 KiB
	// window exactly; one more overruns it.
	empties := make([]*pb.Frame, 1024)
	for i := range empties {
		empties[i] = msgF(1, 0, nil)
	}
	p.sendFrames(empties...)
	p.alive(1)
	p.sendFrames(msgF(1, 0, nil))
	f := p.expect("cancel of stream 1", on(1, "cancel"))
	wantStatus(t, status.FromProto(f.GetCancel().Status), codes.Internal, "flow-control window exceeded")
	if _, err := s.Recv(); status.Code(err) != codes.Internal {
		t.Fatalf("Recv: %v, want INTERNAL", err)
	}
}

func TestRawPluginUnknownStreams(t *testing.T) {
	op := startOperator(t)
	p := registerRaw(t, op, "raw")
	// Ids of the operator's parity that it never opened.
	p.sendFrames(msgF(7, 1, []byte{1}))
	f := p.expect("cancel of stream 7", on(7, "cancel"))
	wantStatus(t, status.FromProto(f.GetCancel().Status), codes.Internal, "unknown stream 7")
	p.sendFrames(&pb.Frame{StreamId: 9, Kind: &pb.Frame_WindowUpdate{WindowUpdate: &pb.WindowUpdate{Increment: 10}}})
	p.expect("cancel of stream 9", on(9, "cancel"))
	// An abort is never answered with an abort.
	p.sendFrames(closeF(11, status.New(codes.OK, "")))
	p.alive(1)
	for {
		select {
		case f := <-p.frames:
			if f.GetStreamId() == 11 {
				t.Fatalf("answered an abort: %v", f)
			}
			continue
		default:
		}
		break
	}
	// Frames with no kind (from a later version) are ignored.
	p.sendFrames(&pb.Frame{}, &pb.Frame{StreamId: 13})
	p.alive(2)
}

// TestRawPluginBadResponses: a plugin that overruns its window or declares
// an oversized message fails that call only.
func TestRawPluginBadResponses(t *testing.T) {
	op := startOperator(t, server.WithMaxBatchSize(4<<20)) // the protocol's default, above the server's

	p := registerRaw(t, op, "raw")
	c := op.call(t, "raw")
	call := func() chan error {
		errc := make(chan error, 1)
		go func() {
			_, err := c.UnaryCall(ctxTimeout(t, 10*time.Second), &testgrpc.SimpleRequest{})
			errc <- err
		}()
		return errc
	}
	serve := func(id uint64, respond func(id uint64)) {
		p.expect("open", on(id, "open"))
		p.expect("half-close", on(id, "halfclose"))
		respond(id)
	}

	// Window overrun: 2 MiB + 1 byte of data against a 2 MiB window.
	errc := call()
	serve(1, func(id uint64) { p.sendFrames(msgF(id, 3<<20, make([]byte, 2<<20+1))) })
	err := <-errc
	wantStatus(t, status.Convert(err), codes.Internal, "flow-control window exceeded")
	f := p.expect("cancel of stream 1", on(1, "cancel"))
	wantStatus(t, status.FromProto(f.GetCancel().Status), codes.Internal, "window")
	p.sendFrames(closeF(1, status.New(codes.Canceled, "")))

	// A message larger than the operator accepts.
	errc = call()
	serve(3, func(id uint64) { p.sendFrames(msgF(id, 5<<20, []byte{1})) })
	wantStatus(t, status.Convert(<-errc), codes.ResourceExhausted, "larger than max")
	p.expect("cancel of stream 3", on(3, "cancel"))
	p.sendFrames(closeF(3, status.New(codes.Canceled, "")))

	// A chunk longer than its message, and a status from outside the code range.
	errc = call()
	serve(5, func(id uint64) { p.sendFrames(msgF(id, 1, []byte{1, 2})) })
	wantStatus(t, status.Convert(<-errc), codes.Internal, "longer than its declared size")
	p.sendFrames(closeF(5, status.New(codes.Canceled, "")))
	errc = call()
	serve(7, func(id uint64) {
		p.sendFrames(&pb.Frame{StreamId: id, Kind: &pb.Frame_Close{Close: &pb.StreamClose{Status: status.New(codes.OK, "odd").Proto()}}})
	})
	// OK without a response message: as gRPC, a cardinality error.
	wantStatus(t, status.Convert(<-errc), codes.Internal, "cardinality violation")

	// The tunnel still serves a well-formed answer.
	errc = call()
	serve(9, func(id uint64) {
		resp := encode(t, &testgrpc.SimpleResponse{Username: "fine"})
		p.sendFrames(msgF(id, uint32(len(resp)), resp), closeF(id, status.New(codes.OK, "")))
	})
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
}

func TestRawPluginTunnelViolations(t *testing.T) {
	op := startOperator(t)
	for name, bad := range map[string]*pb.Frame{
		"wrong parity":             openF(3, "/grpc.testing.TestService/EmptyCall"),
		"second hello":             hello(),
		"stream frame on stream 0": {Kind: &pb.Frame_Message{Message: &pb.StreamMessage{}}},
	} {
		t.Run(name, func(t *testing.T) {
			p := registerRaw(t, op, "raw")
			p.sendFrames(bad)
			f := p.expect("go-away", func(f *pb.Frame) bool { return f.GetGoAway() != nil })
			wantStatus(t, status.FromProto(f.GetGoAway().Reason), codes.Internal, "")
			if err := p.expectEnd(); status.Code(err) != codes.Internal {
				t.Fatalf("stream ended with %v, want INTERNAL", err)
			}
		})
	}
	// The operator still takes tunnels.
	registerRaw(t, op, "raw").alive(1)
}

// rawCodec sends bytes as they are.
type rawCodec struct{}

func (rawCodec) Marshal(v any) (mem.BufferSlice, error) {
	if b, ok := v.(*[]byte); ok {
		return mem.BufferSlice{mem.SliceBuffer(*b)}, nil
	}
	return encoding.GetCodecV2(proto.Name).Marshal(v)
}
func (rawCodec) Unmarshal(data mem.BufferSlice, v any) error {
	return encoding.GetCodecV2(proto.Name).Unmarshal(data, v)
}
func (rawCodec) Name() string { return "proto" }

func TestRawPluginMalformedBatch(t *testing.T) {
	op := startOperator(t)
	p, stream := dialRawPlugin(t, op, grpc.ForceCodecV2(rawCodec{}))
	garbage := []byte{0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f, 1, 2}
	if err := stream.SendMsg(&garbage); err != nil {
		t.Fatal(err)
	}
	if err := p.expectEnd(); status.Code(err) != codes.Internal {
		t.Fatalf("stream ended with %v, want INTERNAL", err)
	}
	registerRaw(t, op, "raw").alive(1)
}

// rawOperator accepts Connect streams and hands them to the test.
type rawOperator struct {
	pb.UnimplementedPluginFrameworkServiceServer
	peers chan *rawPeer
	done  chan struct{}
}

func (o *rawOperator) Connect(stream grpc.BidiStreamingServer[pb.ConnectRequest, pb.ConnectResponse]) error {
	p := &rawPeer{frames: make(chan *pb.Frame, 4096), ended: make(chan error, 1)}
	p.send = func(fs []*pb.Frame) error { return stream.Send(&pb.ConnectResponse{Frames: fs}) }
	go func() {
		for {
			m, err := stream.Recv()
			if err != nil {
				p.ended <- err
				close(p.frames)
				return
			}
			for _, f := range m.GetFrames() {
				p.frames <- f
			}
		}
	}()
	o.peers <- p
	select {
	case <-o.done:
	case <-stream.Context().Done():
	}
	return nil
}

// startRawOperator serves raw Connect streams; next returns the next one,
// handshake done as far as asked.
func startRawOperator(t testing.TB, opts ...grpc.ServerOption) (target string, next func(t testing.TB) *rawPeer) {
	path := socketPath(t)
	lis, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	o := &rawOperator{peers: make(chan *rawPeer, 8), done: make(chan struct{})}
	gs := grpc.NewServer(opts...)
	pb.RegisterPluginFrameworkServiceServer(gs, o)
	go gs.Serve(lis)
	t.Cleanup(func() {
		close(o.done)
		gs.Stop()
	})
	return "unix://" + path, func(t testing.TB) *rawPeer {
		t.Helper()
		select {
		case p := <-o.peers:
			p.t = t
			return p
		case <-time.After(10 * time.Second):
			t.Fatal("no plugin connected within 10s")
			return nil
		}
	}
}

func startRawTarget(t testing.TB, opts ...client.Option) (func(testing.TB) *rawPeer, *client.Client) {
	return startRawTargetWith(t, nil, opts...)
}

func startRawTargetWith(t testing.TB, serverOpts []grpc.ServerOption, opts ...client.Option) (func(testing.TB) *rawPeer, *client.Client) {
	target, next := startRawOperator(t, serverOpts...)
	c, err := client.New(context.Background(), "p", target, "v1", &testgrpc.TestService_ServiceDesc, &testService{},
		append([]client.Option{client.WithBackoff(fastBackoff), client.WithDrainTimeout(time.Second)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return next, c
}

// accept does the operator's half of the handshake: the plugin registers
// once the operator's Hello is in.
func accept(p *rawPeer, settings *pb.Settings) {
	p.expect("hello", func(f *pb.Frame) bool { return f.GetHello() != nil })
	p.sendFrames(helloWith(settings))
	p.expect("register", func(f *pb.Frame) bool { return f.GetRegister() != nil })
}

func ack(p *rawPeer) {
	p.sendFrames(&pb.Frame{Kind: &pb.Frame_RegisterAck{RegisterAck: &pb.RegisterAck{InstanceId: "raw-1"}}})
}

func TestRawOperatorCallBeforeAck(t *testing.T) {
	next, _ := startRawTarget(t)
	p := next(t)
	accept(p, &pb.Settings{})
	p.sendFrames(openF(1, "/grpc.testing.TestService/EmptyCall"))
	f := p.expect("go-away", func(f *pb.Frame) bool { return f.GetGoAway() != nil })
	wantStatus(t, status.FromProto(f.GetGoAway().Reason), codes.Internal, "stream frame open before registration")
	// The plugin tries again, and a call after the ack is served.
	p = next(t)
	accept(p, &pb.Settings{})
	ack(p)
	p.sendFrames(openF(3, "/grpc.testing.TestService/EmptyCall"), msgF(3, 0, nil),
		&pb.Frame{StreamId: 3, Kind: &pb.Frame_HalfClose{HalfClose: &pb.StreamHalfClose{}}})
	f = p.expect("close of stream 3", on(3, "close"))
	wantStatus(t, status.FromProto(f.GetClose().Status), codes.OK, "")
}

// TestRawOperatorRegistersAfterHello: the plugin sends Register only once
// the operator's Hello has arrived (spec 4.1).
func TestRawOperatorRegistersAfterHello(t *testing.T) {
	next, _ := startRawTarget(t)
	p := next(t)
	p.expect("hello", func(f *pb.Frame) bool { return f.GetHello() != nil })
	select {
	case f := <-p.frames:
		t.Fatalf("plugin sent %v before the operator's Hello", f)
	case <-time.After(300 * time.Millisecond):
	}
	p.sendFrames(hello())
	p.expect("register", func(f *pb.Frame) bool { return f.GetRegister() != nil })
}

// TestRawOperatorHeartbeatCap: a plugin asking for a long interval gets
// pinged at the operator's cap, twice its own interval (spec 11).
func TestRawOperatorHeartbeatCap(t *testing.T) {
	op := startOperator(t, server.WithHeartbeatInterval(200*time.Millisecond))
	p, _ := dialRawPlugin(t, op)
	p.sendFrames(helloWith(&pb.Settings{HeartbeatInterval: durationpb.New(time.Hour)}), register("raw"))
	p.expect("register ack", func(f *pb.Frame) bool { return f.GetRegisterAck() != nil })
	start := time.Now()
	for range 3 {
		f := p.expect("ping", func(f *pb.Frame) bool { return f.GetPing() != nil })
		p.sendFrames(&pb.Frame{Kind: &pb.Frame_Pong{Pong: &pb.Pong{Nonce: f.GetPing().GetNonce()}}})
	}
	if el := time.Since(start); el > 2*time.Second {
		t.Fatalf("3 pings took %v: the 1 h interval was not capped at 400 ms", el)
	}
	// Silence is detected on the capped interval too.
	start = time.Now()
	p.sendFrames() // nothing more: no pongs
	if err := p.expectEnd(); status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "heartbeat timeout") {
		t.Fatalf("ended with %v, want a heartbeat timeout", err)
	}
	if el := time.Since(start); el > 2*time.Second {
		t.Fatalf("silence detected after %v", el)
	}
}

func TestRawOperatorBadInput(t *testing.T) {
	next, _ := startRawTarget(t)
	p := next(t)
	accept(p, &pb.Settings{})
	ack(p)
	// Window overrun on a call: that call is closed, the tunnel lives.
	p.sendFrames(openF(1, "/grpc.testing.TestService/FullDuplexCall"), msgF(1, 3<<20, make([]byte, 2<<20+1)))
	f := p.expect("close of stream 1", on(1, "close"))
	wantStatus(t, status.FromProto(f.GetClose().Status), codes.Internal, "flow-control window exceeded")
	// Oversized request.
	p.sendFrames(openF(3, "/grpc.testing.TestService/FullDuplexCall"), msgF(3, 5<<20, []byte{1}))
	f = p.expect("close of stream 3", on(3, "close"))
	wantStatus(t, status.FromProto(f.GetClose().Status), codes.ResourceExhausted, "larger than max")
	// A reused id.
	p.sendFrames(openF(1, "/grpc.testing.TestService/EmptyCall"))
	f = p.expect("close of stream 1", on(1, "close"))
	wantStatus(t, status.FromProto(f.GetClose().Status), codes.Internal, "reused")
	// Unknown ids of either parity.
	p.sendFrames(msgF(2, 1, []byte{1}), msgF(99, 1, []byte{1}))
	p.expect("cancel of stream 2", on(2, "cancel"))
	f = p.expect("close of stream 99", on(99, "close"))
	wantStatus(t, status.FromProto(f.GetClose().Status), codes.Internal, "unknown stream 99")
	// Malformed method and metadata.
	p.sendFrames(openF(5, "nonsense"))
	f = p.expect("close of stream 5", on(5, "close"))
	wantStatus(t, status.FromProto(f.GetClose().Status), codes.Internal, "malformed method")
	p.sendFrames(&pb.Frame{StreamId: 7, Kind: &pb.Frame_Open{Open: &pb.StreamOpen{
		Method:   "/grpc.testing.TestService/EmptyCall",
		Metadata: []*pb.MetadataEntry{{Key: "Bad Key", Values: [][]byte{[]byte("v")}}},
	}}})
	f = p.expect("close of stream 7", on(7, "close"))
	wantStatus(t, status.FromProto(f.GetClose().Status), codes.Internal, "malformed metadata")
	p.alive(1)
}

func TestRawOperatorSilenceMakesPluginReconnect(t *testing.T) {
	next, _ := startRawTarget(t)
	// The operator asks for heartbeats, then never speaks again. An
	// interval below the minimum (100 ms) is raised to it.
	// Silence must last 1.5 intervals (R11-8) and be noticed within 2
	// (R11-9); the upper bound gets 150 ms for a loaded machine's
	// scheduling, less than the half interval that tells 2 from 2.5.
	for _, interval := range []time.Duration{400 * time.Millisecond, 2 * time.Nanosecond} {
		p := next(t)
		accept(p, &pb.Settings{HeartbeatInterval: durationpb.New(interval)})
		start := time.Now() // before the ack: the plugin's silence starts after
		ack(p)
		p.expectEnd()
		eff := max(interval, 100*time.Millisecond)
		el := time.Since(start)
		if lo, hi := eff*3/2, 2*eff+150*time.Millisecond; el < lo || el > hi {
			t.Fatalf("interval %v: plugin noticed silence after %v, want between %v and %v", interval, el, lo, hi)
		}
	}
	// It reconnects and registers again.
	p := next(t)
	accept(p, &pb.Settings{})
	ack(p)
	p.alive(1)
}

func TestRawOperatorSmallBatches(t *testing.T) {
	// The operator accepts batches of 64 KiB only: a 1 MiB response must
	// come in chunks that fit.
	next, _ := startRawTargetWith(t, []grpc.ServerOption{grpc.MaxRecvMsgSize(64 << 10)})
	p := next(t)
	accept(p, &pb.Settings{MaxBatchSize: 64 << 10})
	ack(p)
	req := encode(t, &testgrpc.SimpleRequest{ResponseSize: 1 << 20})
	p.sendFrames(openF(1, "/grpc.testing.TestService/UnaryCall"), msgF(1, uint32(len(req)), req),
		&pb.Frame{StreamId: 1, Kind: &pb.Frame_HalfClose{HalfClose: &pb.StreamHalfClose{}}})
	var got int
	for {
		f := p.expect("response", func(f *pb.Frame) bool { return f.GetStreamId() == 1 })
		if f.GetMessage() != nil {
			got += len(f.GetMessage().Data)
			continue
		}
		wantStatus(t, status.FromProto(f.GetClose().GetStatus()), codes.OK, "")
		break
	}
	if got < 1<<20 {
		t.Fatalf("received %d bytes, want the 1 MiB response", got)
	}
}

func TestRawOperatorCardinalityAndCancel(t *testing.T) {
	next, _ := startRawTarget(t)
	p := next(t)
	accept(p, &pb.Settings{})
	ack(p)
	halfClose := func(id uint64) *pb.Frame {
		return &pb.Frame{StreamId: id, Kind: &pb.Frame_HalfClose{HalfClose: &pb.StreamHalfClose{}}}
	}
	req := encode(t, &testgrpc.SimpleRequest{})
	// Two requests to a unary method; none to a server-streaming one.
	p.sendFrames(openF(1, "/grpc.testing.TestService/UnaryCall"), msgF(1, uint32(len(req)), req), msgF(1, uint32(len(req)), req), halfClose(1))
	f := p.expect("close of stream 1", on(1, "close"))
	wantStatus(t, status.FromProto(f.GetClose().Status), codes.Internal, "cardinality violation")
	p.sendFrames(openF(3, "/grpc.testing.TestService/StreamingOutputCall"), halfClose(3))
	f = p.expect("close of stream 3", on(3, "close"))
	wantStatus(t, status.FromProto(f.GetClose().Status), codes.Internal, "cardinality violation")
	// A cancel whose status says OK still cancels.
	p.sendFrames(openF(5, "/grpc.testing.TestService/FullDuplexCall"),
		&pb.Frame{StreamId: 5, Kind: &pb.Frame_Cancel{Cancel: &pb.StreamCancel{Status: status.New(codes.OK, "").Proto()}}})
	f = p.expect("close of stream 5", on(5, "close"))
	wantStatus(t, status.FromProto(f.GetClose().Status), codes.Canceled, "")
	p.alive(1)
}

func TestRawOperatorRejectWithoutCode(t *testing.T) {
	next, c := startRawTarget(t)
	p := next(t)
	accept(p, &pb.Settings{})
	p.sendFrames(&pb.Frame{Kind: &pb.Frame_RegisterReject{RegisterReject: &pb.RegisterReject{Status: status.New(codes.OK, "go away").Proto()}}})
	err := c.Ready(ctxTimeout(t, 300*time.Millisecond))
	if err == nil || !strings.Contains(err.Error(), "PermissionDenied") {
		t.Fatalf("Ready: %v, want a PermissionDenied refusal", err)
	}
}

func TestRawOperatorUnansweredRegistration(t *testing.T) {
	next, c := startRawTarget(t)
	// A GoAway before the answer ends the attempt: the plugin retries after
	// its backoff, not after its 10 s handshake timeout.
	p := next(t)
	accept(p, &pb.Settings{})
	p.sendFrames(&pb.Frame{Kind: &pb.Frame_GoAway{GoAway: &pb.GoAway{Reason: status.New(codes.Unavailable, "draining").Proto()}}})
	start := time.Now()
	p = next(t)
	if el := time.Since(start); el > 2*time.Second {
		t.Fatalf("new attempt after %v", el)
	}
	// Close does not wait for an answer that may never come.
	accept(p, &pb.Settings{})
	start = time.Now()
	c.Close()
	if el := time.Since(start); el > 2*time.Second {
		t.Fatalf("Close took %v with the registration unanswered", el)
	}
}

// TestRawPluginGoAwayCrossesAnOpen: the operator opens a call as the
// plugin's drain GoAway is on its way. The GoAway's last_stream_id says the
// plugin never saw that stream, so the operator fails it at once as never
// run, and the registry sends the call to another instance (spec 12.1).
func TestRawPluginGoAwayCrossesAnOpen(t *testing.T) {
	op := startOperator(t)
	op.plugin(t, "raw", &testService{}) // a real instance
	p := registerRaw(t, op, "raw")      // the newest: it takes the first call
	done := make(chan error, 1)
	go func() {
		_, err := op.call(t, "raw").EmptyCall(ctxTimeout(t, 10*time.Second), &testgrpc.Empty{})
		done <- err
	}()
	p.expect("open", on(1, "open"))
	var last uint64 // the GoAway left before stream 1 arrived
	p.sendFrames(&pb.Frame{Kind: &pb.Frame_GoAway{GoAway: &pb.GoAway{Reason: status.New(codes.Unavailable, "plugin shutting down").Proto(), LastStreamId: &last}}})
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("the call crossing the GoAway failed: %v, want it served by the other instance", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the call crossing the GoAway is still waiting for an answer")
	}
	// The raw plugin's late refusal of stream 1 is for a known id: ignored.
	p.sendFrames(closeF(1, status.New(codes.Unavailable, "tunnel is draining")))
	p.alive(1)
}
