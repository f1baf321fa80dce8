package tunnel

import (
	"context"
	"errors"

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
	s := ss.s
	s.mu.Lock()
	if s.headerSent || !s.live() {
		s.mu.Unlock()
		return errHeaderSent
	}
	s.header = metadata.Join(s.header, md)
	f := ss.takeHeadersLocked()
	s.mu.Unlock()
	s.t.w.enqueue(s, f...)
	return nil
}

func (ss *serverStream) SetTrailer(md metadata.MD) {
	s := ss.s
	s.mu.Lock()
	defer s.mu.Unlock()
	s.trailer = metadata.Join(s.trailer, md)
}

// takeHeadersLocked marks the headers sent and returns their frame, if there
// is anything to send. Caller holds s.mu.
func (ss *serverStream) takeHeadersLocked() []*pb.Frame {
	if ss.s.headerSent {
		return nil
	}
	ss.s.headerSent = true
	if len(ss.s.header) == 0 {
		return nil
	}
	return []*pb.Frame{headersFrame(ss.s.id, ss.s.header)}
}

func (ss *serverStream) SendMsg(m any) error {
	ss.s.mu.Lock()
	prefix := ss.takeHeadersLocked()
	ss.s.mu.Unlock()
	last, err := ss.s.sendMsg(defaultCodec(), m, prefix)
	if err == nil {
		ss.s.t.w.enqueueOut(ss.s, last)
	}
	return err
}

func (ss *serverStream) RecvMsg(m any) error {
	return ss.s.recvInto(defaultCodec(), m)
}

// reply sends a unary response with the headers before it and the status
// after it, in one batch when credit allows.
func (ss *serverStream) reply(resp any) error {
	s := ss.s
	s.mu.Lock()
	prefix := ss.takeHeadersLocked()
	s.mu.Unlock()
	last, err := s.sendMsg(defaultCodec(), resp, prefix)
	if err != nil {
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
	for _, h := range ss.takeHeadersLocked() {
		frames = append([]outFrame{{f: h}}, frames...)
	}
	frames = append(frames, outFrame{f: closeFrame(s.id, st, s.trailer)})
	if s.final == nil {
		s.final = st
	}
	s.endLocked(stateClosed)
	s.mu.Unlock()
	s.t.removeStream(s) // before the Close: the caller may reuse the slot once it has it
	s.t.w.enqueueOut(s, frames)
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
