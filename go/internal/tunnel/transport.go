package tunnel

import (
	"google.golang.org/grpc"
	"google.golang.org/grpc/mem"

	pb "github.com/guilhem/operator-plugin-framework/go/gen/pluginframework/v1"
)

// Transport carries frame batches: one side of the Connect stream. Send is
// only ever called by the tunnel's write loop and Recv only by its read
// loop, as grpc-go requires.
type Transport interface {
	// Send sends a batch. The transport takes over the buffers' references.
	Send(batch []outFrame) error
	// Recv returns the next batch; a message frame's data may be backed by
	// a pooled buffer, which the receiver frees once done with the data. A
	// batch larger than limit() bytes (0: no limit beyond gRPC's) is not
	// decoded: it comes back with tooLarge set. limit is called once the
	// batch has arrived, so that it sees the tunnel's state at that point.
	Recv(limit func() int) (*inBatch, error)
	// CloseSend ends the sending direction after the last batch. A no-op on
	// the operator's side, where returning from the handler ends the stream.
	CloseSend() error
}

// outFrame is a frame to send. A message frame's data may be a view of a
// pooled buffer (buf), handed to gRPC by reference and freed by it once
// written.
type outFrame struct {
	f   *pb.Frame
	buf mem.Buffer
}

// inFrame is a received frame; buf, when set, backs a message frame's data.
type inFrame struct {
	f   *pb.Frame
	buf mem.Buffer
}

// outBatch and inBatch are what the transports hand to SendMsg and RecvMsg;
// WireCodec encodes and decodes them as ConnectRequest/ConnectResponse.
type outBatch struct {
	frames  []outFrame
	encoded bool // WireCodec took over the frames' references
}

// inBatch is a received batch, or why it was refused undecoded.
type inBatch struct {
	frames   []inFrame
	limit    func() int // set by the receiver: refuse a larger batch undecoded
	tooLarge int        // the size of a batch over limit
	tooMany  bool       // more than maxBatchFrames frames
}

// ServerTransport adapts the operator's end of a Connect stream. The stream
// must use WireCodec.
func ServerTransport(s grpc.BidiStreamingServer[pb.ConnectRequest, pb.ConnectResponse]) Transport {
	return &grpcTransport{s: s}
}

// ClientTransport adapts the plugin's end of a Connect stream. The stream
// must use WireCodec.
func ClientTransport(s grpc.BidiStreamingClient[pb.ConnectRequest, pb.ConnectResponse]) Transport {
	return &grpcTransport{s: s, closeSend: s.CloseSend}
}

type grpcTransport struct {
	s interface {
		SendMsg(any) error
		RecvMsg(any) error
	}
	closeSend func() error
}

func (t *grpcTransport) Send(batch []outFrame) error {
	// A new envelope each time: stats handlers may read a sent message lazily.
	b := &outBatch{frames: batch}
	err := t.s.SendMsg(b)
	if !b.encoded {
		freeOut(batch) // gRPC failed before encoding: the references are still ours
	}
	return err
}

func (t *grpcTransport) Recv(limit func() int) (*inBatch, error) {
	b := &inBatch{limit: limit}
	err := t.s.RecvMsg(b)
	return b, err
}

func (t *grpcTransport) CloseSend() error {
	if t.closeSend == nil {
		return nil
	}
	return t.closeSend()
}
