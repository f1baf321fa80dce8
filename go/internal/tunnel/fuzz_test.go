package tunnel

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/guilhem/operator-plugin-framework/go/gen/pluginframework/v1"
)

// FuzzDecodeBatch checks the hand-written batch decoder against
// proto.Unmarshal: same verdict, same frames, and the encoder round-trips.
func FuzzDecodeBatch(f *testing.F) {
	for _, b := range seedBatches() {
		raw, _ := proto.Marshal(&pb.ConnectResponse{Frames: b})
		f.Add(raw)
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		got, err := decodeBatch(raw, nil)
		var want pb.ConnectResponse
		werr := proto.Unmarshal(raw, &want)
		if (err == nil) != (werr == nil) {
			t.Fatalf("decodeBatch error %v, proto.Unmarshal error %v", err, werr)
		}
		if err != nil {
			return
		}
		if len(got) != len(want.Frames) {
			t.Fatalf("%d frames, proto has %d", len(got), len(want.Frames))
		}
		out := make([]outFrame, len(got))
		for i := range got {
			if !proto.Equal(got[i].f, want.Frames[i]) {
				t.Fatalf("frame %d: %v, proto has %v", i, got[i].f, want.Frames[i])
			}
			out[i].f = got[i].f
		}
		enc, err := encodeBatch(out)
		if err != nil {
			t.Fatal(err)
		}
		var again pb.ConnectResponse
		if err := proto.Unmarshal(enc.Materialize(), &again); err != nil {
			t.Fatalf("re-encoded batch does not parse: %v", err)
		}
		// Unknown fields of the batch itself are dropped (ignored, as the
		// spec says); the frames must come back as they were.
		if len(again.Frames) != len(want.Frames) {
			t.Fatalf("round trip: %d frames, want %d", len(again.Frames), len(want.Frames))
		}
		for i := range again.Frames {
			if !proto.Equal(again.Frames[i], want.Frames[i]) {
				t.Fatalf("round trip changed frame %d", i)
			}
		}
	})
}

// FuzzPluginSide feeds arbitrary frames, after a valid handshake, to the
// plugin side of a tunnel that serves a real service. Whatever arrives, it
// must not panic, and once the transport ends the tunnel must close and
// every handler return.
func FuzzPluginSide(f *testing.F) {
	for _, b := range seedBatches() {
		f.Add(encodeInput(b))
	}
	f.Fuzz(func(t *testing.T, input []byte) {
		tr := newMemTransport()
		d := NewDispatcher(logr.Discard(), nil, nil)
		d.RegisterService(&testgrpc.TestService_ServiceDesc, fuzzService{})
		tun := New(tr, Config{
			Side:     PluginSide,
			Settings: Settings{MaxMessageSize: 64 << 10, InitialWindowSize: 16 << 10, MaxConcurrentStreams: 8},
			Register: &pb.Register{Name: "fuzz"},
			Handler:  d,
		})
		tr.in <- []*pb.Frame{
			{Kind: &pb.Frame_Hello{Hello: &pb.Hello{MinVersion: MinVersion, MaxVersion: MaxVersion}}},
			{Kind: &pb.Frame_RegisterAck{RegisterAck: &pb.RegisterAck{InstanceId: "x"}}},
		}
		for _, b := range decodeInput(input) {
			tr.in <- b
		}
		close(tr.in)
		select {
		case <-tun.Done():
		case <-time.After(5 * time.Second):
			t.Fatal("tunnel still open 5s after its transport ended")
		}
		tun.Wait()
		if n := tun.InFlight(); n != 0 {
			t.Fatalf("%d streams left after close", n)
		}
	})
}

// encodeInput and decodeInput map fuzz bytes to batches: each batch is a
// 2-byte length and an encoded ConnectResponse.
func encodeInput(batches ...[]*pb.Frame) []byte {
	var out []byte
	for _, b := range batches {
		raw, _ := proto.Marshal(&pb.ConnectResponse{Frames: b})
		out = binary.BigEndian.AppendUint16(out, uint16(len(raw)))
		out = append(out, raw...)
	}
	return out
}

func decodeInput(in []byte) [][]*pb.Frame {
	var out [][]*pb.Frame
	for len(in) >= 2 {
		n := int(binary.BigEndian.Uint16(in))
		in = in[2:]
		n = min(n, len(in))
		var m pb.ConnectResponse
		if proto.Unmarshal(in[:n], &m) == nil {
			out = append(out, m.Frames)
		}
		in = in[n:]
	}
	return out
}

func seedBatches() [][]*pb.Frame {
	req, _ := proto.Marshal(&testgrpc.SimpleRequest{ResponseSize: 10})
	method := "/grpc.testing.TestService/UnaryCall"
	return [][]*pb.Frame{
		{
			openFrame(1, method, nil, durationpb.New(time.Second)),
			messageFrame(1, uint32(len(req)), req),
			halfCloseFrame(1),
		},
		{
			openFrame(3, "/grpc.testing.TestService/FullDuplexCall", nil, nil),
			messageFrame(3, 10, []byte{1, 2, 3}),
			messageFrame(3, 0, []byte{4, 5, 6, 7, 8, 9, 10}),
			windowUpdateFrame(3, 100),
			cancelFrame(3, status.New(codes.Canceled, "")),
		},
		{pingFrame(7), goAwayFrame(status.New(codes.Unavailable, "bye"), 0)},
		{messageFrame(5, 1, []byte{1}), closeFrame(2, status.New(codes.OK, ""), nil)},
	}
}

// memTransport is an in-memory Transport: batches pushed on in are
// received; sent batches are dropped.
type memTransport struct {
	in chan []*pb.Frame
}

func newMemTransport() *memTransport { return &memTransport{in: make(chan []*pb.Frame, 64)} }

func (m *memTransport) Send(batch []outFrame) error {
	freeOut(batch)
	return nil
}

func (m *memTransport) Recv(func() int) (*inBatch, error) {
	b, ok := <-m.in
	if !ok {
		return nil, io.EOF
	}
	out := make([]inFrame, len(b))
	for i, f := range b {
		out[i].f = f
		if msg := f.GetMessage(); msg != nil && len(msg.Data) > 0 {
			out[i].buf = mem.Copy(msg.Data, mem.DefaultBufferPool())
			msg.Data = out[i].buf.ReadOnlyData()
		}
	}
	return &inBatch{frames: out}, nil
}

func (m *memTransport) CloseSend() error { return nil }

// fuzzService answers the TestService calls the seeds make.
type fuzzService struct {
	testgrpc.UnimplementedTestServiceServer
}

func (fuzzService) UnaryCall(_ context.Context, in *testgrpc.SimpleRequest) (*testgrpc.SimpleResponse, error) {
	return &testgrpc.SimpleResponse{Payload: &testgrpc.Payload{Body: make([]byte, min(in.ResponseSize, 1<<10))}}, nil
}

func (fuzzService) FullDuplexCall(stream testgrpc.TestService_FullDuplexCallServer) error {
	for {
		in, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if err := stream.Send(&testgrpc.StreamingOutputCallResponse{Payload: in.Payload}); err != nil {
			return err
		}
	}
}
