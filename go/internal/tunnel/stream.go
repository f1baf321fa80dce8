package tunnel

import (
	"context"
	"io"
	"sync"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	pb "github.com/guilhem/operator-plugin-framework/go/gen/pluginframework/v1"
)

// streamState is where a stream is in its life, seen from this side.
//
// Caller:  open → halfClosedLocal (sent HalfClose) → closed (received Close).
// Handler: open → halfClosedRemote (received HalfClose) → closed (sent Close).
// Either side enters cancelling when the caller cancels (or a protocol
// violation aborts the stream); the handler still owes a Close, which frees
// the caller's concurrency slot, so both sides count the same open streams.
type streamState uint8

const (
	stateOpen streamState = iota
	stateHalfClosedLocal
	stateHalfClosedRemote
	stateCancelling
	stateClosed
)

// chunk is one received StreamMessage.
type chunk struct {
	first bool   // begins a message
	size  uint32 // the message's total size, on a first chunk
	data  []byte
	buf   mem.Buffer // backs data when set; freed once data is consumed
}

// freeChunks releases the buffers of chunks nobody will read.
func freeChunks(cs []chunk) {
	for _, c := range cs {
		freeBuffer(c.buf)
	}
}

type stream struct {
	id     uint64
	t      *Tunnel
	method string
	caller bool // this side opened the stream

	// ctx is the call's context on the caller side and the handler's
	// context on the handler side (cancelled through cancel).
	ctx    context.Context
	cancel context.CancelCauseFunc

	maxRecv  int // largest message accepted
	maxSend  int // largest message sent
	maxChunk int // largest chunk sent

	// Guarded by t.w.mu: frames waiting for the write loop.
	out     []outFrame
	queued  bool
	aborted bool // nothing more is sent on this stream

	slotFreed bool // guarded by t.mu

	mu         sync.Mutex
	state      streamState
	send       sendWindow
	recv       recvWindow
	chunks     []chunk
	pending    uint32     // bytes still due for the message being received
	asm        []byte     // message being assembled by the consumer
	asmBuf     mem.Buffer // the pooled buffer behind asm
	asmN       int
	headerSent bool // handler: headers are on their way
	header     metadata.MD
	trailer    metadata.MD
	final      *status.Status // caller: the call's status once known
	refused    bool           // caller: the peer never ran it (refusedByPeer)

	headerC    chan struct{} // caller: closed when headers, a message or the end arrives
	recvNotify chan struct{} // data or state change for the consumer
	sendNotify chan struct{} // credit or state change for the producer
	done       chan struct{} // closed when this side may no longer send or receive
}

func newStream(t *Tunnel, id uint64, method string, caller bool, ctx context.Context) *stream {
	s := &stream{
		id:         id,
		t:          t,
		method:     method,
		caller:     caller,
		ctx:        ctx,
		maxRecv:    t.local.MaxMessageSize,
		maxSend:    t.peer.MaxMessageSize,
		maxChunk:   t.chunk,
		send:       sendWindow{avail: int64(t.peer.InitialWindowSize)},
		recv:       newRecvWindow(t.local.InitialWindowSize),
		recvNotify: make(chan struct{}, 1),
		sendNotify: make(chan struct{}, 1),
		done:       make(chan struct{}),
	}
	if caller {
		s.headerC = make(chan struct{})
	}
	return s
}

func notify(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

// live reports whether the stream still exchanges data. Caller holds s.mu.
func (s *stream) live() bool { return s.state < stateCancelling }

// canSend reports whether this side may still send messages. Caller holds s.mu.
func (s *stream) canSend() bool {
	return s.state == stateOpen || (!s.caller && s.state == stateHalfClosedRemote)
}

// endLocked moves to a final state and wakes every waiter. Caller holds s.mu.
func (s *stream) endLocked(state streamState) {
	if s.state >= stateCancelling {
		s.state = max(s.state, state)
		return
	}
	s.state = state
	if state == stateCancelling {
		s.dropReceivedLocked() // nobody will read them
	}
	if s.headerC != nil {
		select {
		case <-s.headerC:
		default:
			close(s.headerC)
		}
	}
	close(s.done)
	if s.cancel != nil {
		s.cancel(s.final.Err())
	}
}

// dropReceivedLocked frees what was received and not consumed: queued
// chunks and a partly assembled message. Caller holds s.mu.
func (s *stream) dropReceivedLocked() {
	freeChunks(s.chunks)
	freeBuffer(s.asmBuf)
	s.chunks, s.asm, s.asmBuf = nil, nil, nil
}

// sendError is what a producer sees once it may no longer send. Caller holds s.mu.
func (s *stream) sendErrorLocked() error {
	if s.caller {
		// As in grpc-go: SendMsg returns io.EOF and the status comes from RecvMsg.
		return io.EOF
	}
	if err := s.final.Err(); err != nil {
		return err
	}
	return status.Error(codes.Internal, "send after the handler finished")
}

// takeCredit waits until the peer has granted credit for a chunk and
// returns how many of want data bytes it may carry. It takes what there is
// rather than waiting for all of it: keeping data flowing is worth more
// than the copy a split message costs the receiver (measured: about a fifth
// of the throughput of 1 MiB messages).
func (s *stream) takeCredit(want int) (int, error) {
	for {
		s.mu.Lock()
		if !s.canSend() {
			err := s.sendErrorLocked()
			s.mu.Unlock()
			return 0, err
		}
		n, ok := s.send.take(want)
		s.mu.Unlock()
		if ok {
			return n, nil
		}
		select {
		case <-s.sendNotify:
		case <-s.done:
		}
	}
}

// writeMessage queues data as one message, chunked and paced by flow
// control, after the prefix frames. root, when set, is the pooled buffer
// holding data: each chunk takes a reference of its own to the part it
// carries, and writeMessage frees the caller's (buffers.go). It returns the
// last chunk (with the prefix if nothing went before) unqueued, so that the
// caller can queue it together with what must follow it, in one batch.
func (s *stream) writeMessage(prefix []*pb.Frame, data []byte, root mem.Buffer) ([]outFrame, error) {
	defer freeBuffer(root)
	frames := make([]outFrame, len(prefix), len(prefix)+2)
	for i, f := range prefix {
		frames[i].f = f
	}
	if len(data) > s.maxSend {
		return frames, status.Errorf(codes.ResourceExhausted, "trying to send message larger than max (%d vs. %d)", len(data), s.maxSend)
	}
	size := uint32(len(data))
	for off := 0; ; {
		n, err := s.takeCredit(min(len(data)-off, s.maxChunk))
		if err != nil {
			return frames, err
		}
		f := outFrame{f: messageFrame(s.id, 0, data[off:off+n])}
		if off == 0 {
			f.f.GetMessage().Size = size
		}
		if root != nil && n > 0 {
			f.buf = root.Slice(off, off+n)
		}
		off += n
		frames = append(frames, f)
		if off == len(data) {
			return frames, nil
		}
		s.t.w.enqueueOut(s, frames)
		frames = nil
	}
}

// sendMsg encodes m and writes it as with writeMessage.
func (s *stream) sendMsg(c codec, m any, prefix []*pb.Frame) ([]outFrame, error) {
	data, buf, err := c.marshal(m)
	if err != nil {
		return nil, err
	}
	return s.writeMessage(prefix, data, buf)
}

// recvInto receives the next message into m.
func (s *stream) recvInto(c codec, m any) error {
	data, buf, err := s.recvMsg()
	if err != nil {
		return err
	}
	err = c.unmarshal(data, m)
	if buf != nil {
		buf.Free()
	}
	return err
}

// recvMsg returns the next whole message and, when set, the buffer behind
// it, to free once the message is decoded. At the end it returns io.EOF (a
// clean end) or the stream's status as an error.
func (s *stream) recvMsg() ([]byte, mem.Buffer, error) {
	for {
		s.mu.Lock()
		msg, buf, ok, chunks, consumed := s.assembleLocked()
		var inc uint32
		if chunks > 0 && s.live() {
			inc = s.recv.onConsumed(chunks, consumed)
		}
		var err error
		if !ok {
			err = s.recvEndLocked()
		}
		s.mu.Unlock()
		if inc > 0 {
			s.t.w.control(windowUpdateFrame(s.id, inc))
		}
		if ok || err != nil {
			return msg, buf, err
		}
		select {
		case <-s.recvNotify:
		case <-s.done:
		}
	}
}

// assembleLocked pops received chunks into the message being assembled and
// returns it once whole, with the number of chunks and data bytes consumed.
// The message's buffer, when set, passes to the caller (buffers.go).
func (s *stream) assembleLocked() (msg []byte, buf mem.Buffer, ok bool, chunks, consumed int) {
	for len(s.chunks) > 0 {
		c := s.chunks[0]
		s.chunks[0] = chunk{}
		s.chunks = s.chunks[1:]
		chunks++
		consumed += len(c.data)
		if c.first {
			if int(c.size) == len(c.data) {
				return c.data, c.buf, true, chunks, consumed // the common case: no copy
			}
			// Every byte is overwritten: a pooled buffer needs no clearing.
			p := BufferPool.Get(int(c.size))
			s.asm, s.asmBuf, s.asmN = *p, mem.NewBuffer(p, BufferPool), 0
		}
		s.asmN += copy(s.asm[s.asmN:], c.data)
		freeBuffer(c.buf)
		if s.asmN == len(s.asm) {
			msg, buf = s.asm, s.asmBuf
			s.asm, s.asmBuf = nil, nil
			return msg, buf, true, chunks, consumed
		}
	}
	return nil, nil, false, chunks, consumed
}

// recvEndLocked reports why no more messages will come, or nil to keep
// waiting. Caller holds s.mu and has found no whole message.
func (s *stream) recvEndLocked() error {
	switch {
	case s.caller && s.state == stateClosed:
		if s.refused {
			return refusedError{s.final}
		}
		if s.final.Code() != codes.OK {
			return s.final.Err()
		}
		if s.asm != nil || s.pending > 0 {
			return status.Error(codes.Internal, "stream closed in the middle of a message")
		}
		return io.EOF
	case s.state >= stateCancelling:
		if err := s.final.Err(); err != nil {
			return err
		}
		return status.Error(codes.Canceled, "stream ended")
	case !s.caller && s.state == stateHalfClosedRemote && s.pending == 0 && s.asm == nil:
		return io.EOF
	}
	return nil
}

// Frame handlers, called by the read loop. A non-nil result is a protocol
// violation confined to this stream.

func (s *stream) onHeaders(h *pb.StreamHeaders) *status.Status {
	md, err := decodeMetadata(h.GetMetadata())
	if err != nil {
		return status.New(codes.Internal, "malformed headers: "+err.Error())
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.caller {
		return status.New(codes.Internal, "headers sent by the caller")
	}
	if !s.live() {
		return nil
	}
	select {
	case <-s.headerC:
		return status.New(codes.Internal, "headers after headers or messages")
	default:
	}
	s.header = md
	close(s.headerC)
	return nil
}

// onMessage takes over buf, the buffer behind m's data, if set.
func (s *stream) onMessage(m *pb.StreamMessage, buf mem.Buffer) *status.Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	kept := false
	defer func() {
		if !kept && buf != nil {
			buf.Free()
		}
	}()
	if !s.live() {
		return nil // the stream ended here first; the peer had not heard yet
	}
	if !s.caller && s.state == stateHalfClosedRemote {
		return status.New(codes.Internal, "message after half-close")
	}
	n := len(m.GetData())
	if !s.recv.onChunk(n) {
		return status.New(codes.Internal, "flow-control window exceeded")
	}
	c := chunk{data: m.GetData(), buf: buf}
	if s.pending == 0 {
		if int64(m.GetSize()) > int64(s.maxRecv) {
			return status.Newf(codes.ResourceExhausted, "received message larger than max (%d vs. %d)", m.GetSize(), s.maxRecv)
		}
		if n > int(m.GetSize()) {
			return status.New(codes.Internal, "message chunk longer than its declared size")
		}
		c.first, c.size = true, m.GetSize()
		s.pending = m.GetSize() - uint32(n)
	} else {
		if n == 0 {
			return status.New(codes.Internal, "empty continuation chunk")
		}
		if n > int(s.pending) {
			return status.New(codes.Internal, "message chunk longer than its declared size")
		}
		s.pending -= uint32(n)
	}
	if s.caller {
		select {
		case <-s.headerC:
		default:
			close(s.headerC) // a response without headers
		}
	}
	s.chunks = append(s.chunks, c)
	kept = true
	notify(s.recvNotify)
	return nil
}

func (s *stream) onHalfClose() *status.Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.caller {
		return status.New(codes.Internal, "half-close sent by the handler")
	}
	switch s.state {
	case stateOpen:
		if s.pending > 0 {
			return status.New(codes.Internal, "half-close in the middle of a message")
		}
		s.state = stateHalfClosedRemote
		notify(s.recvNotify)
		return nil
	case stateHalfClosedRemote:
		return status.New(codes.Internal, "second half-close")
	}
	return nil
}

func (s *stream) onWindowUpdate(u *pb.WindowUpdate) *status.Status {
	if u.GetIncrement() == 0 {
		return status.New(codes.Internal, "window update of zero")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.send.grant(u.GetIncrement()) {
		return status.New(codes.Internal, "window update overflows the window")
	}
	notify(s.sendNotify)
	return nil
}

// onCancel: the caller aborted the call (handler side).
func (s *stream) onCancel(c *pb.StreamCancel) *status.Status {
	if s.caller {
		return status.New(codes.Internal, "cancel sent by the handler")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.final == nil {
		s.final = statusFromProto(c.GetStatus(), codes.Canceled)
		if s.final.Code() == codes.OK {
			s.final = status.New(codes.Canceled, s.final.Message())
		}
	}
	s.endLocked(stateCancelling)
	return nil
}

// onClose: the handler finished (caller side).
func (s *stream) onClose(c *pb.StreamClose) *status.Status {
	if !s.caller {
		return status.New(codes.Internal, "close sent by the caller")
	}
	md, err := decodeMetadata(c.GetTrailers())
	s.mu.Lock()
	if s.live() {
		if err != nil {
			s.final = status.New(codes.Internal, "malformed trailers: "+err.Error())
		} else {
			s.final = statusFromProto(c.GetStatus(), codes.OK)
			s.trailer = md
		}
		s.endLocked(stateClosed)
	} else {
		s.state = stateClosed
	}
	s.mu.Unlock()
	s.t.w.discard(s) // the handler reads no more
	s.t.removeStream(s)
	return nil
}

// abort ends the stream from this side with st: a caller cancels, a handler
// closes. Used for local cancellation and for the peer's violations.
func (s *stream) abort(st *status.Status) {
	s.mu.Lock()
	if !s.live() {
		s.mu.Unlock()
		return
	}
	s.final = st
	if s.caller {
		s.endLocked(stateCancelling)
	} else {
		s.endLocked(stateClosed) // the Close below is the one the handler owed
	}
	s.mu.Unlock()
	s.t.w.discard(s)
	if s.caller {
		s.t.w.control(cancelFrame(s.id, st))
	} else {
		s.t.releaseSlot(s) // before the Close: the caller may reuse the slot once it has it
		s.t.w.control(closeFrame(s.id, st, nil))
		s.t.removeStream(s)
	}
}

// refusedByPeer ends a caller stream that crossed the peer's GoAway: the
// peer never ran it and refuses it (spec 12.1), so it fails at once, in a
// way the registry may retry elsewhere, and its slot is freed. The peer's
// refusal, when it comes, is for a known id and ignored.
func (s *stream) refusedByPeer() {
	s.mu.Lock()
	if !s.live() {
		s.mu.Unlock()
		return
	}
	s.refused = true
	s.final = status.New(codes.Unavailable, "plugin tunnel is draining")
	s.dropReceivedLocked()
	s.endLocked(stateClosed)
	s.mu.Unlock()
	s.t.w.discard(s)
	s.t.removeStream(s)
}

// tunnelClosed ends the stream because the tunnel is gone.
func (s *stream) tunnelClosed(st *status.Status) {
	s.mu.Lock()
	if s.final == nil || s.live() {
		s.final = st
	}
	s.dropReceivedLocked()
	s.endLocked(stateClosed)
	s.mu.Unlock()
}
