package conformance

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/guilhem/operator-plugin-framework/go/gen/pluginframework/v1"
)

// rawCaller makes gRPC calls over a raw tunnel the runner accepted as the
// operator: a caller of its own, written from the spec and sharing nothing
// with the framework's engine, so that steps such as integrity can run
// against the plugin with operator settings the Go server does not offer
// (a 64 KiB max_batch_size). It cuts messages into chunks of random
// lengths within the plugin's credit, and checks what the plugin sends:
// the credit it was granted (chunk cost included), the chunk rules of spec
// 7.2 and the chunk bound of the runner's batch limit. A plugin breaking
// them fails the call with INTERNAL and a message saying what it did.
type rawCaller struct {
	rc    *rawConn
	peer  peerSettings // the plugin's
	own   peerSettings // the runner's, from its Hello
	slots chan struct{}

	mu     sync.Mutex
	rng    *rand.Rand
	nextID uint64
}

var _ grpc.ClientConnInterface = (*rawCaller)(nil)

func newRawCaller(rc *rawConn, seed uint64) (*rawCaller, error) {
	peer, ok := rc.peerSettings()
	rc.mu.Lock()
	own, next := rc.own, rc.maxOpen+2
	rc.mu.Unlock()
	if !ok || own == nil {
		return nil, errors.New("raw calls need the Hello exchange done (accept)")
	}
	if next%2 == 0 {
		next++
	}
	return &rawCaller{
		rc: rc, peer: peer, own: *own,
		slots:  make(chan struct{}, peer.MaxConcurrentStreams),
		rng:    rand.New(rand.NewPCG(seed, 7)),
		nextID: max(next, 1),
	}, nil
}

func (c *rawCaller) Invoke(ctx context.Context, method string, args, reply any, opts ...grpc.CallOption) error {
	s, err := c.NewStream(ctx, &grpc.StreamDesc{}, method, opts...)
	if err != nil {
		return err
	}
	if err := s.SendMsg(args); err != nil && !errors.Is(err, io.EOF) {
		return err
	}
	if err := s.CloseSend(); err != nil {
		return err
	}
	return s.RecvMsg(reply)
}

func (c *rawCaller) NewStream(ctx context.Context, desc *grpc.StreamDesc, method string, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	select {
	case c.slots <- struct{}{}:
	case <-ctx.Done():
		return nil, status.FromContextError(ctx.Err()).Err()
	}
	s := &rawStream{c: c, desc: desc, ctx: ctx, notify: make(chan struct{}),
		credit: int64(c.peer.InitialWindowSize), recvCredit: int64(c.own.InitialWindowSize)}
	for _, o := range opts {
		switch o := o.(type) {
		case grpc.HeaderCallOption:
			s.headerAddr = o.HeaderAddr
		case grpc.TrailerCallOption:
			s.trailerAddr = o.TrailerAddr
		}
	}
	open := &pb.StreamOpen{Method: method}
	if md, ok := metadata.FromOutgoingContext(ctx); ok {
		for _, k := range sortedKeys(md) {
			e := &pb.MetadataEntry{Key: k}
			for _, v := range md[k] {
				e.Values = append(e.Values, []byte(v))
			}
			open.Metadata = append(open.Metadata, e)
		}
	}
	if dl, ok := ctx.Deadline(); ok {
		left := time.Until(dl)
		if left <= 0 {
			<-c.slots
			return nil, status.Error(codes.DeadlineExceeded, "context deadline exceeded")
		}
		open.Timeout = durationpb.New(left)
	}
	// Ids are taken and opened under one lock: StreamOpen frames leave in
	// increasing id order (spec 3.2), or the plugin sees a reused id.
	c.mu.Lock()
	s.id = c.nextID
	c.nextID += 2
	c.rc.mu.Lock()
	c.rc.taps[s.id] = s.onFrame
	c.rc.mu.Unlock()
	err := c.send(&pb.Frame{StreamId: s.id, Kind: &pb.Frame_Open{Open: open}})
	c.mu.Unlock()
	if err != nil {
		s.finish()
		return nil, err
	}
	return s, nil
}

func (c *rawCaller) send(frames ...*pb.Frame) error {
	if err := c.rc.sendFrames(frames); err != nil {
		return status.Errorf(codes.Unavailable, "raw tunnel: %v", err)
	}
	return nil
}

// chunkLen picks the data length of the next chunk: the most allowed half
// the time, else a random length up to it.
func (c *rawCaller) chunkLen(most int) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	if most <= 1 || c.rng.IntN(2) == 0 {
		return most
	}
	return 1 + c.rng.IntN(most)
}

// rawStream is one call of the raw caller.
type rawStream struct {
	c    *rawCaller
	id   uint64
	desc *grpc.StreamDesc
	ctx  context.Context

	headerAddr, trailerAddr *metadata.MD

	sendMu sync.Mutex // one SendMsg at a time, as gRPC asks of callers

	mu         sync.Mutex
	notify     chan struct{} // closed and replaced on every change
	credit     int64         // send credit the plugin granted
	recvCredit int64         // credit the plugin has left towards the runner
	partial    []byte        // message being reassembled
	pending    int           // its bytes still due
	msgs       []rawMsg      // complete messages not yet read
	received   int           // messages received
	header     metadata.MD
	gotHeader  bool
	halfClosed bool
	closed     bool // StreamClose received
	st         *status.Status
	trailer    metadata.MD
	violation  *status.Status // what the plugin did wrong, once
	cancelled  bool           // StreamCancel sent
	done       bool           // slot and tap released
}

// rawMsg is a complete message not yet read, and the credit its last chunk
// took (the others' went back as they arrived).
type rawMsg struct {
	data []byte
	cost int64
}

// returnCredit sends a WindowUpdate. Called with s.mu held.
func (s *rawStream) returnCredit(inc uint32) {
	if s.closed || s.cancelled || inc == 0 {
		return
	}
	s.recvCredit += int64(inc)
	f := &pb.Frame{StreamId: s.id, Kind: &pb.Frame_WindowUpdate{WindowUpdate: &pb.WindowUpdate{Increment: inc}}}
	go func() { _ = s.c.send(f) }() // not under s.mu: the read loop takes it
}

func (s *rawStream) changed() {
	close(s.notify)
	s.notify = make(chan struct{})
}

// violate records the plugin's first protocol violation on the stream.
func (s *rawStream) violate(format string, args ...any) {
	if s.violation == nil {
		s.violation = status.Newf(codes.Internal, "the plugin broke the protocol: "+format, args...)
	}
}

// onFrame takes a frame of this stream, on the raw tunnel's read loop.
func (s *rawStream) onFrame(f *pb.Frame) {
	s.mu.Lock()
	defer s.mu.Unlock()
	defer s.changed()
	if s.closed {
		return
	}
	switch k := f.GetKind().(type) {
	case *pb.Frame_Headers:
		if s.gotHeader || s.received > 0 || s.partial != nil {
			s.violate("headers after headers or messages")
			return
		}
		md, err := decodeMD(k.Headers.GetMetadata())
		if err != nil {
			s.violate("malformed headers: %v", err)
			return
		}
		s.header, s.gotHeader = md, true
	case *pb.Frame_Message:
		m := k.Message
		data := m.GetData()
		cost := int64(len(data)) + 64
		if cost > s.recvCredit {
			s.violate("flow-control window exceeded: a chunk of %d bytes costs %d, %d credit left", len(data), cost, s.recvCredit)
			return
		}
		s.recvCredit -= cost
		if most := s.c.own.MaxBatchSize - 64; len(data) > most {
			s.violate("a chunk of %d bytes, more than max_batch_size - 64 = %d", len(data), most)
			return
		}
		if s.pending == 0 {
			if int(m.GetSize()) > s.c.own.MaxMessageSize {
				s.violate("message of %d bytes, above max_message_size %d", m.GetSize(), s.c.own.MaxMessageSize)
				return
			}
			if len(data) > int(m.GetSize()) {
				s.violate("message chunk longer than its declared size (%d > %d)", len(data), m.GetSize())
				return
			}
			if len(data) == 0 && m.GetSize() > 0 {
				s.violate("a first chunk without data for a message of %d bytes (spec 7.1: senders should not)", m.GetSize())
				return
			}
			s.partial = make([]byte, 0, m.GetSize())
			s.pending = int(m.GetSize())
		} else if len(data) == 0 {
			s.violate("empty continuation chunk")
			return
		} else if len(data) > s.pending {
			s.violate("message chunk longer than its declared size (%d > %d due)", len(data), s.pending)
			return
		}
		s.partial = append(s.partial, data...)
		s.pending -= len(data)
		if s.pending > 0 {
			// Copied into a partly reassembled message: consumed, and its
			// credit goes back at once, or a message larger than the window
			// could never arrive (spec 8.1).
			s.returnCredit(uint32(cost))
			return
		}
		s.msgs = append(s.msgs, rawMsg{data: s.partial, cost: cost})
		s.received++
		s.partial = nil
	case *pb.Frame_WindowUpdate:
		s.credit += int64(k.WindowUpdate.GetIncrement())
	case *pb.Frame_Close:
		s.closed = true
		s.st = status.FromProto(k.Close.GetStatus())
		if s.st.Code() > codes.Unauthenticated {
			s.st = status.New(codes.Unknown, s.st.Message())
		}
		md, err := decodeMD(k.Close.GetTrailers())
		if err != nil {
			s.violate("malformed trailers: %v", err)
		}
		s.trailer = md
		if s.partial != nil && s.st.Code() == codes.OK {
			s.violate("stream closed in the middle of a message")
		}
		s.release()
	default:
		s.violate("%s frame sent by the handler", kindOf(f))
	}
}

// release frees the stream's slot and tap once its StreamClose arrived.
// Called with s.mu held.
func (s *rawStream) release() {
	if s.done {
		return
	}
	s.done = true
	s.c.rc.mu.Lock()
	delete(s.c.rc.taps, s.id)
	s.c.rc.mu.Unlock()
	<-s.c.slots
}

// finish releases the stream without waiting for its StreamClose (the
// tunnel is gone).
func (s *rawStream) finish() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.release()
}

func decodeMD(entries []*pb.MetadataEntry) (metadata.MD, error) {
	md := metadata.MD{}
	for _, e := range entries {
		for _, c := range []byte(e.GetKey()) {
			if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c == '-' || c == '_' || c == '.') {
				return nil, fmt.Errorf("invalid metadata key %q", e.GetKey())
			}
		}
		for _, v := range e.GetValues() {
			md.Append(e.GetKey(), string(v))
		}
	}
	return md, nil
}

// wait blocks until cond holds (checked with s.mu held), the tunnel ends
// or ctx ends. It returns with s.mu held.
func (s *rawStream) wait(cond func() bool) error {
	for !cond() {
		notify := s.notify
		s.mu.Unlock()
		select {
		case <-notify:
		case <-s.c.rc.endC:
			s.mu.Lock()
			if !cond() {
				s.release()
				return status.Error(codes.Unavailable, "plugin tunnel closed")
			}
			return nil
		case <-s.ctx.Done():
			s.mu.Lock()
			return s.abort(status.FromContextError(s.ctx.Err()))
		}
		s.mu.Lock()
	}
	return nil
}

// abort ends the call with st: StreamCancel to the plugin. Called with
// s.mu held; returns st as an error.
func (s *rawStream) abort(st *status.Status) error {
	if !s.cancelled && !s.closed {
		s.cancelled = true
		f := &pb.Frame{StreamId: s.id, Kind: &pb.Frame_Cancel{Cancel: &pb.StreamCancel{Status: st.Proto()}}}
		go func() { _ = s.c.send(f) }() // not under s.mu: the read loop takes it
	}
	return st.Err()
}

func (s *rawStream) Header() (metadata.MD, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	err := s.wait(func() bool { return s.gotHeader || s.received > 0 || s.closed || s.violation != nil })
	return s.header, err
}

func (s *rawStream) Trailer() metadata.MD {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.trailer
}

func (s *rawStream) Context() context.Context { return s.ctx }

func (s *rawStream) CloseSend() error {
	s.mu.Lock()
	if s.halfClosed || s.closed || s.cancelled {
		s.mu.Unlock()
		return nil
	}
	s.halfClosed = true
	s.mu.Unlock()
	return s.c.send(&pb.Frame{StreamId: s.id, Kind: &pb.Frame_HalfClose{HalfClose: &pb.StreamHalfClose{}}})
}

// SendMsg sends one message in chunks of random lengths, each within the
// credit the plugin granted (its data plus 64) and the plugin's batch
// limit, waiting for WindowUpdates as needed.
func (s *rawStream) SendMsg(m any) error {
	data, err := proto.Marshal(m.(proto.Message))
	if err != nil {
		return status.Errorf(codes.Internal, "marshal: %v", err)
	}
	if len(data) > s.c.peer.MaxMessageSize {
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.abort(status.Newf(codes.ResourceExhausted, "trying to send message larger than max (%d vs. %d)", len(data), s.c.peer.MaxMessageSize))
	}
	s.sendMu.Lock()
	defer s.sendMu.Unlock()
	for off, first := 0, true; first || off < len(data); first = false {
		s.mu.Lock()
		need := int64(65)
		if len(data) == 0 {
			need = 64
		}
		if err := s.wait(func() bool { return s.credit >= need || s.closed || s.cancelled || s.violation != nil }); err != nil {
			s.mu.Unlock()
			return err
		}
		if s.closed || s.cancelled || s.violation != nil {
			s.mu.Unlock()
			return io.EOF // RecvMsg says how the call ended
		}
		most := min(len(data)-off, int(s.credit)-64, s.c.peer.MaxBatchSize-64)
		n := most
		if len(data)-off > 0 {
			n = s.c.chunkLen(most)
		}
		s.credit -= int64(n) + 64
		s.mu.Unlock()
		msg := &pb.StreamMessage{Data: data[off : off+n]}
		if first {
			msg.Size = uint32(len(data))
		}
		if err := s.c.send(&pb.Frame{StreamId: s.id, Kind: &pb.Frame_Message{Message: msg}}); err != nil {
			return err
		}
		off += n
	}
	return nil
}

// RecvMsg delivers the next message and returns its credit to the plugin
// at once. For a call without server streaming it also waits for the end,
// as gRPC does, to report the call's status.
func (s *rawStream) RecvMsg(m any) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	err := s.wait(func() bool { return len(s.msgs) > 0 || s.closed || s.violation != nil })
	if err != nil {
		return err
	}
	if s.violation != nil {
		return s.abort(s.violation)
	}
	if len(s.msgs) == 0 {
		if s.headerAddr != nil {
			*s.headerAddr = s.header
		}
		if s.trailerAddr != nil {
			*s.trailerAddr = s.trailer
		}
		if s.st.Code() != codes.OK {
			return s.st.Err()
		}
		if !s.desc.ServerStreams {
			return status.Error(codes.Internal, "cardinality violation: received no response message from non-streaming RPC")
		}
		return io.EOF
	}
	msg := s.msgs[0]
	s.msgs = s.msgs[1:]
	s.returnCredit(uint32(msg.cost))
	if err := proto.Unmarshal(msg.data, m.(proto.Message)); err != nil {
		return s.abort(status.Newf(codes.Internal, "grpc: failed to unmarshal the received message: %v", err))
	}
	if s.desc.ServerStreams {
		return nil
	}
	if err := s.wait(func() bool { return len(s.msgs) > 0 || s.closed || s.violation != nil }); err != nil {
		return err
	}
	switch {
	case s.violation != nil:
		return s.abort(s.violation)
	case len(s.msgs) > 0:
		return s.abort(status.New(codes.Internal, "cardinality violation: expected <EOF> for non server-streaming RPCs, but received another message"))
	}
	if s.headerAddr != nil {
		*s.headerAddr = s.header
	}
	if s.trailerAddr != nil {
		*s.trailerAddr = s.trailer
	}
	return s.st.Err()
}
