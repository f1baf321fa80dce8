package tunnel

import (
	"context"
	"errors"
	"io"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	grpcproto "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/trace"

	"github.com/guilhem/operator-plugin-framework/go/internal/callerr"
)

// The caller side: a Tunnel is a grpc.ClientConnInterface, so generated
// clients call through it as they would through a *grpc.ClientConn.
var _ grpc.ClientConnInterface = (*Tunnel)(nil)

// callInfo is what a call's options ask for.
type callInfo struct {
	codec    codec
	maxRecv  int
	maxSend  int
	headers  []*metadata.MD
	trailers []*metadata.MD
	peers    []*peer.Peer
	creds    []interface {
		GetRequestMetadata(ctx context.Context, uri ...string) (map[string]string, error)
	}
	onFinish []func(error)
}

func (t *Tunnel) callInfo(opts []grpc.CallOption) (*callInfo, error) {
	ci := &callInfo{codec: defaultCodec(), maxRecv: t.local.MaxMessageSize, maxSend: t.peer.MaxMessageSize}
	for _, o := range opts {
		switch o := o.(type) {
		case grpc.HeaderCallOption:
			ci.headers = append(ci.headers, o.HeaderAddr)
		case grpc.TrailerCallOption:
			ci.trailers = append(ci.trailers, o.TrailerAddr)
		case grpc.PeerCallOption:
			ci.peers = append(ci.peers, o.PeerAddr)
		case grpc.MaxRecvMsgSizeCallOption:
			ci.maxRecv = min(ci.maxRecv, o.MaxRecvMsgSize)
		case grpc.MaxSendMsgSizeCallOption:
			ci.maxSend = min(ci.maxSend, o.MaxSendMsgSize)
		case grpc.ForceCodecV2CallOption:
			ci.codec = codec{v2: o.CodecV2}
		case grpc.ForceCodecCallOption:
			ci.codec = codec{v1: o.Codec}
		case grpc.ContentSubtypeCallOption:
			c := encoding.GetCodecV2(o.ContentSubtype)
			if c == nil {
				return nil, status.Errorf(codes.Internal, "no codec registered for content-subtype %s", o.ContentSubtype)
			}
			ci.codec = codec{v2: c}
		case grpc.PerRPCCredsCallOption:
			ci.creds = append(ci.creds, o.Creds)
		case grpc.OnFinishCallOption:
			ci.onFinish = append(ci.onFinish, o.OnFinish)
		}
		// Wait-for-ready is the registry's business (it picks the tunnel);
		// compression does not apply inside the tunnel.
	}
	// The handler decodes protobuf: another encoding would be misread.
	if name := ci.codec.name(); name != grpcproto.Name {
		return nil, status.Errorf(codes.Internal, "the tunnel carries protobuf messages; codec %q is not supported", name)
	}
	return ci, nil
}

// open starts a stream: it takes a concurrency slot (waiting for one if the
// peer's limit is reached), assigns the next id and queues the Open frame.
// Ids are assigned and Opens queued under one lock, so that they leave in
// increasing order; Opens travel with control frames, which always leave
// before stream data. The write loop is not woken: the caller queues more.
func (t *Tunnel) open(ctx context.Context, method string, ci *callInfo) (*stream, trace.Span, error) {
	if !validMethod(method) {
		return nil, nil, status.Errorf(codes.Internal, "malformed method name %q", method)
	}
	ctx, span := startSpan(ctx, method, trace.SpanKindClient)
	s, err := t.openSpan(ctx, method, ci)
	if err != nil {
		endSpan(span, status.Convert(err))
		return nil, nil, err
	}
	return s, span, nil
}

// openSpan is open within the call's span.
func (t *Tunnel) openSpan(ctx context.Context, method string, ci *callInfo) (*stream, error) {
	if err := ctx.Err(); err != nil {
		return nil, status.FromContextError(err).Err()
	}
	md, _ := metadata.FromOutgoingContext(ctx) // a copy: ours to change
	if prop := otel.GetTextMapPropagator(); len(prop.Fields()) > 0 {
		if md == nil {
			md = metadata.MD{}
		}
		prop.Inject(ctx, MetadataCarrier(md))
	}
	for _, c := range ci.creds {
		extra, err := c.GetRequestMetadata(ctx, method)
		if err != nil {
			return nil, status.Errorf(codes.Unauthenticated, "per-RPC credentials: %v", err)
		}
		md = md.Copy()
		for k, v := range extra {
			md.Append(k, v)
		}
	}
	if err := checkMetadata(md); err != nil {
		return nil, err
	}

	t.mu.Lock()
	slots, err := t.acceptingErr()
	t.mu.Unlock()
	if err != nil {
		return nil, err
	}
	select {
	case slots <- struct{}{}:
	case <-ctx.Done():
		return nil, status.FromContextError(ctx.Err()).Err()
	case <-t.done:
		return nil, t.unavailable()
	}
	// The time left is taken once a slot is ours, so that the handler's
	// deadline is not later than the caller's.
	var timeout *durationpb.Duration
	if dl, ok := ctx.Deadline(); ok {
		left := time.Until(dl)
		if left <= 0 {
			<-slots
			return nil, status.Error(codes.DeadlineExceeded, context.DeadlineExceeded.Error())
		}
		timeout = durationpb.New(left)
	}
	t.mu.Lock()
	if _, err := t.acceptingErr(); err != nil {
		t.mu.Unlock()
		<-slots
		return nil, err
	}
	id := t.nextID
	open := openFrame(id, method, md, timeout)
	if frameSize(open) > t.peer.MaxBatchSize-batchReserve {
		t.mu.Unlock()
		<-slots
		return nil, status.Errorf(codes.ResourceExhausted, "request metadata of %d bytes is larger than the plugin accepts", proto.Size(open))
	}
	t.nextID += 2
	s := newStream(t, id, method, true, ctx)
	s.maxRecv, s.maxSend = ci.maxRecv, ci.maxSend
	t.streams[id] = s
	t.w.push(open)
	t.mu.Unlock()
	return s, nil
}

// acceptingErr returns the slot channel, or why no call may start. Caller
// holds t.mu.
func (t *Tunnel) acceptingErr() (chan struct{}, error) {
	switch {
	case t.err != nil:
		return nil, t.unavailable()
	case t.phase != phaseReady:
		return nil, refused("plugin tunnel is not registered")
	case t.goingAway || t.peerGoAway:
		return nil, refused("plugin tunnel is draining")
	}
	return t.slots, nil
}

func (t *Tunnel) unavailable() error { return refused("plugin tunnel closed") }

// refusedError is an UNAVAILABLE status for a call turned away before any
// of it was sent. It matches callerr.ErrRefused (registry.ErrRefused), so
// that the registry sends the call to another instance: the call cannot
// have run.
type refusedError struct{ st *status.Status }

func refused(msg string) error { return refusedError{status.New(codes.Unavailable, msg)} }

func (e refusedError) Error() string              { return e.st.Err().Error() }
func (e refusedError) GRPCStatus() *status.Status { return e.st }
func (e refusedError) Unwrap() error              { return callerr.ErrRefused }

var unaryDesc = &grpc.StreamDesc{}

// Invoke performs a unary call through the tunnel.
func (t *Tunnel) Invoke(ctx context.Context, method string, args, reply any, opts ...grpc.CallOption) error {
	ci, err := t.callInfo(opts)
	if err != nil {
		return err
	}
	data, buf, err := ci.codec.marshal(args)
	if err != nil {
		return err
	}
	if len(data) > ci.maxSend {
		if buf != nil {
			buf.Free()
		}
		return status.Errorf(codes.ResourceExhausted, "trying to send message larger than max (%d vs. %d)", len(data), ci.maxSend)
	}
	s, span, err := t.open(ctx, method, ci)
	if err != nil {
		if buf != nil {
			buf.Free()
		}
		return err
	}
	cs := newClientStream(s, unaryDesc, ci, span)
	// Open, request and half-close leave together, in one batch.
	last, err := s.writeMessage(nil, data, buf)
	if err != nil && !errors.Is(err, io.EOF) {
		cs.finish(err)
		return err
	}
	if err == nil {
		s.mu.Lock()
		if s.state == stateOpen {
			s.state = stateHalfClosedLocal
		}
		s.mu.Unlock()
		s.t.w.enqueueOut(s, append(last, outFrame{f: halfCloseFrame(s.id)}))
	}
	return cs.RecvMsg(reply)
}

// NewStream opens a streaming call through the tunnel.
func (t *Tunnel) NewStream(ctx context.Context, desc *grpc.StreamDesc, method string, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	ci, err := t.callInfo(opts)
	if err != nil {
		return nil, err
	}
	s, span, err := t.open(ctx, method, ci)
	if err != nil {
		return nil, err
	}
	t.w.signal()
	return newClientStream(s, desc, ci, span), nil
}

// clientStream is a call as its caller sees it.
type clientStream struct {
	s          *stream
	desc       *grpc.StreamDesc
	ci         *callInfo
	span       trace.Span
	stop       func() bool // unregisters the cancellation hook
	finishOnce sync.Once
}

var _ grpc.ClientStream = (*clientStream)(nil)

func newClientStream(s *stream, desc *grpc.StreamDesc, ci *callInfo, span trace.Span) *clientStream {
	cs := &clientStream{s: s, desc: desc, ci: ci, span: span}
	cs.stop = context.AfterFunc(s.ctx, func() {
		s.abort(status.FromContextError(s.ctx.Err()))
	})
	return cs
}

func (cs *clientStream) Context() context.Context { return cs.s.ctx }

// cancelled aborts the stream at once when the caller's context has ended.
// The abort also runs from context.AfterFunc, but asynchronously: without
// this a response arriving meanwhile could still complete a call whose
// caller had cancelled before reading, which grpc-go never does.
func (cs *clientStream) cancelled() {
	if err := cs.s.ctx.Err(); err != nil {
		cs.s.abort(status.FromContextError(err))
	}
}

func (cs *clientStream) Header() (metadata.MD, error) {
	cs.cancelled()
	<-cs.s.headerC
	cs.s.mu.Lock()
	defer cs.s.mu.Unlock()
	if cs.s.header != nil {
		return cs.s.header.Copy(), nil
	}
	if cs.s.final != nil && cs.s.final.Code() != codes.OK {
		return nil, cs.s.final.Err()
	}
	return metadata.MD{}, nil
}

// Trailer is valid once RecvMsg has returned an error (io.EOF included).
func (cs *clientStream) Trailer() metadata.MD {
	cs.s.mu.Lock()
	defer cs.s.mu.Unlock()
	return cs.s.trailer.Copy()
}

func (cs *clientStream) CloseSend() error {
	cs.cancelled()
	s := cs.s
	s.mu.Lock()
	send := s.state == stateOpen
	if send {
		s.state = stateHalfClosedLocal
	}
	s.mu.Unlock()
	if send {
		s.t.w.enqueue(s, halfCloseFrame(s.id))
	}
	return nil
}

func (cs *clientStream) SendMsg(m any) error {
	cs.cancelled()
	last, err := cs.s.sendMsg(cs.ci.codec, m, nil)
	if err != nil {
		if !errors.Is(err, io.EOF) {
			cs.finish(err)
			return err
		}
		if !cs.desc.ClientStreams {
			// As grpc-go: generated code fails a server-streaming call on
			// any error from its one SendMsg, so a stream that ended
			// before the request left says nothing here and RecvMsg
			// reports its status.
			return nil
		}
		return err
	}
	cs.s.t.w.enqueueOut(cs.s, last)
	return nil
}

func (cs *clientStream) RecvMsg(m any) error {
	cs.cancelled()
	if err := cs.s.recvInto(cs.ci.codec, m); err != nil {
		if errors.Is(err, io.EOF) && !cs.desc.ServerStreams {
			err = status.Error(codes.Internal, "cardinality violation: received no response message from non-streaming RPC")
		}
		cs.finish(err)
		return err
	}
	if cs.desc.ServerStreams {
		return nil
	}
	// Not server-streaming: exactly one message, then the status.
	_, buf, err := cs.s.recvMsg()
	if buf != nil {
		buf.Free()
	}
	switch {
	case err == nil:
		err = status.Error(codes.Internal, "cardinality violation: expected <EOF> for non server-streaming RPCs, but received another message")
	case errors.Is(err, io.EOF):
		err = nil
	}
	cs.finish(err)
	return err
}

// finish runs once when the call ends for its caller: it aborts the stream
// if the end is local (codec errors, cardinality), then fills in the call
// options that report on the call.
func (cs *clientStream) finish(err error) {
	cs.finishOnce.Do(func() {
		if errors.Is(err, io.EOF) {
			err = nil
		}
		cs.stop()
		if err != nil {
			cs.s.abort(status.Convert(err))
		}
		cs.s.mu.Lock()
		header, trailer := cs.s.header, cs.s.trailer
		cs.s.mu.Unlock()
		for _, h := range cs.ci.headers {
			*h = header.Copy()
		}
		for _, tr := range cs.ci.trailers {
			*tr = trailer.Copy()
		}
		if p, ok := peer.FromContext(cs.s.t.ctx); ok {
			for _, dst := range cs.ci.peers {
				*dst = *p
			}
		}
		for _, f := range cs.ci.onFinish {
			f(err)
		}
		endSpan(cs.span, status.Convert(err))
	})
}
