package tunnel

import (
	"google.golang.org/grpc"

	pb "github.com/guilhem/operator-plugin-framework/go/gen/pluginframework/v1"
)

// Transport carries frame batches: one side of the Connect stream. Send is
// only ever called by the tunnel's write loop and Recv only by its read
// loop, as grpc-go requires.
type Transport interface {
	Send(frames []*pb.Frame) error
	Recv() ([]*pb.Frame, error)
	// CloseSend ends the sending direction after the last batch. A no-op on
	// the operator's side, where returning from the handler ends the stream.
	CloseSend() error
}

// ServerTransport adapts the operator's end of a Connect stream.
func ServerTransport(s grpc.BidiStreamingServer[pb.ConnectRequest, pb.ConnectResponse]) Transport {
	return &serverTransport{s: s}
}

type serverTransport struct {
	s grpc.BidiStreamingServer[pb.ConnectRequest, pb.ConnectResponse]
}

func (t *serverTransport) Send(frames []*pb.Frame) error {
	// A new envelope each time: stats handlers may read a sent message lazily.
	return t.s.Send(&pb.ConnectResponse{Frames: frames})
}

func (t *serverTransport) Recv() ([]*pb.Frame, error) {
	m, err := t.s.Recv()
	return m.GetFrames(), err
}

func (t *serverTransport) CloseSend() error { return nil }

// ClientTransport adapts the plugin's end of a Connect stream.
func ClientTransport(s grpc.BidiStreamingClient[pb.ConnectRequest, pb.ConnectResponse]) Transport {
	return &clientTransport{s: s}
}

type clientTransport struct {
	s grpc.BidiStreamingClient[pb.ConnectRequest, pb.ConnectResponse]
}

func (t *clientTransport) Send(frames []*pb.Frame) error {
	return t.s.Send(&pb.ConnectRequest{Frames: frames})
}

func (t *clientTransport) Recv() ([]*pb.Frame, error) {
	m, err := t.s.Recv()
	return m.GetFrames(), err
}

func (t *clientTransport) CloseSend() error { return t.s.CloseSend() }
