package registry

import (
	"context"
	"errors"
	"io"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/stats"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// call is one call as metrics and stats handlers see it: it begins when
// the innermost invoker or streamer runs and ends exactly once, when its
// caller sees its status, when a stream's context ends first (a stream
// cancelled, or dropped without being read to its end), or when it could
// not start.
type call struct {
	p      *PluginProvider
	ctx    context.Context // tagged by the stats handlers
	method string
	start  time.Time

	mu              sync.Mutex  // a stream's end may come from its context's watch
	header, trailer metadata.MD // unary: filled by the call options
	headerSeen      bool

	once    sync.Once
	stopCtx func() bool // a stream's context watch
}

func (p *PluginProvider) begin(ctx context.Context, method string, desc *grpc.StreamDesc, opts []grpc.CallOption) *call {
	c := &call{p: p, ctx: ctx, method: method, start: time.Now()}
	if len(p.cfg.stats) > 0 {
		failFast := !waitForReady(opts)
		for _, h := range p.cfg.stats {
			c.ctx = h.TagRPC(c.ctx, &stats.RPCTagInfo{FullMethodName: method, FailFast: failFast})
		}
		c.handle(&stats.Begin{
			Client: true, BeginTime: c.start, FailFast: failFast,
			IsClientStream: desc.ClientStreams, IsServerStream: desc.ServerStreams,
		})
		md, _ := metadata.FromOutgoingContext(c.ctx)
		c.handle(&stats.OutHeader{Client: true, FullMethod: method, Header: md.Copy()})
	}
	return c
}

func (c *call) handle(rs stats.RPCStats) {
	for _, h := range c.p.cfg.stats {
		h.HandleRPC(c.ctx, rs)
	}
}

func (c *call) stats() bool { return len(c.p.cfg.stats) > 0 }

// captureMetadata asks a unary call for its headers and trailers, which
// stats handlers are told about.
func (c *call) captureMetadata(opts []grpc.CallOption) []grpc.CallOption {
	if !c.stats() {
		return opts
	}
	return append(opts, grpc.Header(&c.header), grpc.Trailer(&c.trailer))
}

func (c *call) outPayload(m any) {
	if c.stats() {
		n := size(m)
		c.handle(&stats.OutPayload{Client: true, Payload: m, Length: n, WireLength: n, CompressedLength: n, SentTime: time.Now()})
	}
}

func (c *call) inPayload(m any) {
	if c.stats() {
		n := size(m)
		c.handle(&stats.InPayload{Client: true, Payload: m, Length: n, WireLength: n, CompressedLength: n, RecvTime: time.Now()})
	}
}

// inHeader reports the response headers once; header, when not nil,
// replaces those the call options captured.
func (c *call) inHeader(header metadata.MD) {
	if !c.stats() {
		return
	}
	c.mu.Lock()
	seen := c.headerSeen
	c.headerSeen = true
	if header != nil {
		c.header = header
	}
	md := c.header
	c.mu.Unlock()
	if !seen {
		c.handle(&stats.InHeader{Client: true, FullMethod: c.method, Header: md})
	}
}

func (c *call) setTrailer(md metadata.MD) {
	c.mu.Lock()
	c.trailer = md
	c.mu.Unlock()
}

// end records the call's end, once.
func (c *call) end(err error) {
	c.once.Do(func() {
		c.mu.Lock()
		stop := c.stopCtx
		c.mu.Unlock()
		if stop != nil {
			stop()
		}
		observe(c.p.name, c.method, c.start, err)
		if c.stats() {
			c.mu.Lock()
			trailer := c.trailer
			c.mu.Unlock()
			if err == nil {
				c.handle(&stats.InTrailer{Client: true, Trailer: trailer})
			}
			c.handle(&stats.End{Client: true, BeginTime: c.start, EndTime: time.Now(), Trailer: trailer, Error: err})
		}
	})
}

// stream wraps a call's stream so that its end is recorded: a stream whose
// context ends before its caller saw its status ends then, with the
// context's status.
func (c *call) stream(cs grpc.ClientStream, desc *grpc.StreamDesc) grpc.ClientStream {
	if c.stats() {
		cs = &observedStream{ClientStream: cs, c: c}
	}
	c.mu.Lock() // end may run before AfterFunc returns
	c.stopCtx = context.AfterFunc(c.ctx, func() {
		c.end(status.FromContextError(c.ctx.Err()).Err())
	})
	c.mu.Unlock()
	return &onEndStream{ClientStream: cs, desc: desc, onEnd: c.end}
}

// observedStream reports a stream's messages and headers to stats handlers.
type observedStream struct {
	grpc.ClientStream
	c *call
}

func (s *observedStream) SendMsg(m any) error {
	err := s.ClientStream.SendMsg(m)
	if err == nil {
		s.c.outPayload(m)
	}
	return err
}

func (s *observedStream) RecvMsg(m any) error {
	err := s.ClientStream.RecvMsg(m)
	// Once RecvMsg has returned, the headers have arrived (or the call
	// ended without any): Header does not block.
	md, _ := s.ClientStream.Header()
	s.c.inHeader(md)
	if err == nil {
		s.c.inPayload(m)
	} else {
		s.c.setTrailer(s.ClientStream.Trailer())
	}
	return err
}

// onEndStream calls onEnd once, when a stream's caller sees its end: an
// error from RecvMsg (io.EOF for a clean end), the one response of a call
// that is not server-streaming, or an error other than io.EOF from SendMsg
// (io.EOF there only says that the status is for RecvMsg to report; the
// engine, as grpc-go, returns nil instead for a call that is not
// client-streaming).
type onEndStream struct {
	grpc.ClientStream
	desc  *grpc.StreamDesc
	onEnd func(error)
	once  sync.Once
}

func (s *onEndStream) ended(err error) { s.once.Do(func() { s.onEnd(err) }) }

func (s *onEndStream) SendMsg(m any) error {
	err := s.ClientStream.SendMsg(m)
	if err != nil && !errors.Is(err, io.EOF) {
		s.ended(err)
	}
	return err
}

func (s *onEndStream) RecvMsg(m any) error {
	err := s.ClientStream.RecvMsg(m)
	switch {
	case err == nil:
		if !s.desc.ServerStreams {
			s.ended(nil)
		}
	case errors.Is(err, io.EOF):
		s.ended(nil)
	default:
		s.ended(err)
	}
	return err
}

func size(m any) int {
	if pm, ok := m.(proto.Message); ok {
		return proto.Size(pm)
	}
	return 0
}
