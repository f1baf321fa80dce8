package tunnel

import (
	"context"
	"errors"
	"io"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	pb "github.com/guilhem/operator-plugin-framework/go/gen/pluginframework/v1"
)

// serverStream is a call as its handler sees it: the grpc.ServerStream of
// streaming handlers.
type serverStream struct {
	s *stream
	// clientStreams: the method takes a stream of requests; otherwise
	// exactly one, as grpc-go checks.
	clientStreams bool
}

// transportStream is the grpc.ServerTransportStream behind grpc.SetHeader,
// grpc.SendHeader and grpc.SetTrailer; only SetTrailer's signature differs.
type transportStream struct{ *serverStream }

func (ts transportStream) SetTrailer(md metadata.MD) error {
	ts.serverStream.SetTrailer(md)
	return nil
}

var (
	_ grpc.ServerStream          = (*serverStream)(nil)
	_ grpc.ServerTransportStream = transportStream{}
)

var errHeaderSent = status.Error(codes.Internal, "grpc: the stream is done or SendHeader was already called")

func (ss *serverStream) Method() string           { return ss.s.method }
func (ss *serverStream) Context() context.Context { return ss.s.ctx }

func (ss *serverStream) SetHeader(md metadata.MD) error {
	if err := checkMetadata(md); err != nil {
		return err
	}
	s := ss.s
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.headerSent || !s.live() {
		return errHeaderSent
	}
	s.header = metadata.Join(s.header, md)
	return nil
}

func (ss *serverStream) SendHeader(md metadata.MD) error {
	if err := checkMetadata(md); err != nil {
		return err
	}
	s := ss.s
	s.mu.Lock()
	if s.headerSent || !s.live() {
		s.mu.Unlock()
		return errHeaderSent
	}
	s.header = metadata.Join(s.header, md)
	f, st := ss.takeHeadersLocked()
	s.mu.Unlock()
	if st != nil {
		s.abort(st)
		return st.Err()
	}
	s.t.w.enqueue(s, f...)
	return nil
}

// SetTrailer drops invalid metadata: the interface has no way to say so.
func (ss *serverStream) SetTrailer(md metadata.MD) {
	if checkMetadata(md) != nil {
		return
	}
	s := ss.s
	s.mu.Lock()
	defer s.mu.Unlock()
	s.trailer = metadata.Join(s.trailer, md)
}

// takeHeadersLocked marks the headers sent and returns their frame, if there
// is anything to send. Headers too large for a batch of the operator's
// cannot be sent (spec 3.3): the status returned then fails the stream.
// Caller holds s.mu.
func (ss *serverStream) takeHeadersLocked() ([]*pb.Frame, *status.Status) {
	if ss.s.headerSent {
		return nil, nil
	}
	ss.s.headerSent = true
	if len(ss.s.header) == 0 {
		return nil, nil
	}
	f := headersFrame(ss.s.id, ss.s.header)
	if n := frameSize(f); n > ss.s.t.peer.MaxBatchSize-batchReserve {
		return nil, status.Newf(codes.ResourceExhausted, "response headers of %d bytes are larger than the operator accepts", n)
	}
	return []*pb.Frame{f}, nil
}

func (ss *serverStream) SendMsg(m any) error {
	ss.s.mu.Lock()
	prefix, st := ss.takeHeadersLocked()
	ss.s.mu.Unlock()
	if st != nil {
		ss.s.abort(st)
		return st.Err()
	}
	last, err := ss.s.sendMsg(defaultCodec(), m, prefix)
	if err != nil {
		ss.unsent(prefix, last)
		return err
	}
	ss.s.t.w.enqueueOut(ss.s, last)
	return nil
}

// unsent notes that headers taken for a send that failed before queueing
// them are still to be sent (with the status).
func (ss *serverStream) unsent(prefix []*pb.Frame, last []outFrame) {
	if len(prefix) > 0 && len(last) > 0 && last[0].f == prefix[0] {
		ss.s.mu.Lock()
		ss.s.headerSent = false
		ss.s.mu.Unlock()
	}
}

func (ss *serverStream) RecvMsg(m any) error {
	err := ss.s.recvInto(defaultCodec(), m)
	if ss.clientStreams {
		return err
	}
	if errors.Is(err, io.EOF) {
		return status.Error(codes.Internal, "cardinality violation: received no request message from non-client-streaming RPC")
	}
	if err != nil {
		return err
	}
	_, buf, err := ss.s.recvMsg()
	if buf != nil {
		buf.Free()
	}
	switch {
	case err == nil:
		return status.Error(codes.Internal, "cardinality violation: received multiple request messages for non-client-streaming RPC")
	case errors.Is(err, io.EOF):
		return nil
	}
	return err
}

// reply sends a unary response with the headers before it and the status
// after it, in one batch when credit allows.
func (ss *serverStream) reply(resp any) error {
	s := ss.s
	s.mu.Lock()
	prefix, st := ss.takeHeadersLocked()
	s.mu.Unlock()
	if st != nil {
		s.abort(st)
		return st.Err()
	}
	last, err := s.sendMsg(defaultCodec(), resp, prefix)
	if err != nil {
		ss.unsent(prefix, last)
		return err
	}
	ss.close(last, status.New(codes.OK, ""))
	return nil
}

// finish sends the handler's final status, unless a reply or an abort has
// already closed the stream. After a caller's cancel it is the Close the
// caller waits for.
func (ss *serverStream) finish(err error) {
	ss.close(nil, handlerStatus(err))
}

// close queues frames, then the headers if still unsent, then the Close,
// unless the stream is already closed.
func (ss *serverStream) close(frames []outFrame, st *status.Status) {
	s := ss.s
	s.mu.Lock()
	if s.state == stateClosed {
		s.mu.Unlock()
		freeOut(frames)
		return
	}
	headers, tooLarge := ss.takeHeadersLocked()
	for _, h := range headers {
		frames = append([]outFrame{{f: h}}, frames...)
	}
	cf := closeFrame(s.id, st, s.trailer)
	if tooLarge != nil {
		st = tooLarge
		freeOut(frames)
		frames = nil
		cf = closeFrame(s.id, st, nil)
	}
	if frameSize(cf) > s.t.peer.MaxBatchSize-batchReserve {
		cf = closeFrame(s.id, status.New(codes.ResourceExhausted, "response status and trailers are larger than the operator accepts"), nil)
	}
	frames = append(frames, outFrame{f: cf})
	if s.final == nil {
		s.final = st
	}
	s.endLocked(stateClosed)
	s.mu.Unlock()
	s.t.releaseSlot(s) // before the Close: the caller may reuse the slot once it has it
	s.t.w.enqueueOut(s, frames)
	s.t.removeStream(s)
}

// handlerStatus is the status a handler's error stands for.
func handlerStatus(err error) *status.Status {
	if err == nil {
		return status.New(codes.OK, "")
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		if _, ok := status.FromError(err); !ok {
			return status.FromContextError(err)
		}
	}
	return status.Convert(err)
}
