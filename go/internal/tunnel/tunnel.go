package tunnel

import (
	"context"
	"errors"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	pb "github.com/guilhem/operator-plugin-framework/go/gen/pluginframework/v1"
)

// Side says which end of the Connect stream a tunnel is.
type Side uint8

const (
	// OperatorSide accepted the Connect stream. It opens odd stream ids.
	OperatorSide Side = iota
	// PluginSide dialled the operator and registers. It opens even ids
	// (unused in protocol version 1).
	PluginSide
)

// phase is where the tunnel is in its handshake.
type phase uint8

const (
	phaseHello    phase = iota // waiting for the peer's Hello
	phaseRegister              // waiting for Register (operator) or its answer (plugin)
	phaseReady                 // registered: calls flow
)

// Config describes one tunnel.
type Config struct {
	Side Side
	// Settings are this side's limits (defaults applied by New).
	Settings Settings
	// Register is sent by the plugin side right after its Hello.
	Register *pb.Register
	// Handler serves the streams the peer opens; nil refuses them with
	// UNIMPLEMENTED.
	Handler *Dispatcher
	// Peer is what handler contexts report as their peer (peer.FromContext).
	Peer *peer.Peer
	// OnGoAway is called from the read loop when the peer sends GoAway. It
	// must not block.
	OnGoAway func(reason *status.Status)
	// Replica identifies the operator's process to plugins (operator side,
	// spec 4.7).
	Replica Replica
	// BeforeRegister is called on the plugin side once the operator's Hello
	// has arrived, before Register is sent; a non-nil status closes the
	// tunnel unregistered with that status (a duplicate tunnel to a
	// replica, spec 14.3). It runs in a goroutine of its own.
	BeforeRegister func(Replica) *status.Status
	// MaxHeartbeatInterval caps the heartbeat interval the peer can ask
	// for (spec 11); 0: no cap.
	MaxHeartbeatInterval time.Duration
	// ReadInCaller: New starts no read loop; the caller runs ReadLoop. The
	// operator runs it in the goroutine gRPC gave the Connect handler,
	// which otherwise only waits (one goroutine less per tunnel). The
	// caller must then make Recv return once the tunnel closes (OnClose),
	// since on the operator's side the stream ends only when the handler
	// returns, or when gRPC's stream is ended with its status.
	ReadInCaller bool
	// OnClose, when set, is called once the tunnel has closed, with why
	// (Err's status; OK after a clean drain). It must not block.
	OnClose func(*status.Status)
	Logger  logr.Logger
}

// Replica is what an operator's Hello says of the operator process.
type Replica struct {
	// ID tells the operator's replicas apart; empty when the operator
	// does not say.
	ID string
	// Count is how many replicas the operator runs, 0 when unknown.
	Count int
}

// Tunnel is one end of a tunnel: it multiplexes calls over a Transport. The
// operator's side opens streams through it (it is a
// grpc.ClientConnInterface); the plugin's side serves them with its
// Dispatcher.
type Tunnel struct {
	cfg   Config
	local Settings
	tr    Transport
	w     *writer
	log   logr.Logger

	// ctx is the parent of handler contexts; cancelled when the tunnel closes.
	ctx       context.Context
	cancelCtx context.CancelFunc

	done      chan struct{}
	closeOnce sync.Once
	err       *status.Status // why the tunnel closed; set before done is closed
	failure   *status.Status // set by fail before a flushing close
	lastRecv  atomic.Int64   // unix nanoseconds of the last received batch
	readEnded atomic.Bool    // the transport's Recv has failed

	helloC    chan struct{} // closed when the peer's Hello arrives
	registerC chan struct{} // closed when Register (operator) or its answer (plugin) arrives

	mu           sync.Mutex
	phase        phase
	peer         Settings
	version      uint32
	registration *pb.Register    // operator side: what the plugin sent
	ack          *pb.RegisterAck // plugin side: the operator's answer
	peerReplica  Replica         // plugin side: from the operator's Hello
	streams      map[uint64]*stream
	nextID       uint64 // next id this side opens
	lastPeerID   uint64 // highest id the peer opened
	handling     int    // streams the peer opened that are still open
	chunk        int    // largest chunk the peer's batch limit allows
	goingAway    bool   // this side sent GoAway
	peerGoAway   bool   // the peer sent GoAway
	slots        chan struct{}
	idle         chan struct{} // closed and replaced whenever streams becomes empty
	hb           *heartbeat    // set once the peer's Hello is in (heartbeat.go)
}

// New starts a tunnel over tr: it sends this side's Hello (and, on the plugin
// side, its Register) and runs the read and write loops until the tunnel
// closes.
func New(tr Transport, cfg Config) *Tunnel {
	ctx, cancel := context.WithCancel(context.Background())
	if cfg.Peer != nil {
		ctx = peer.NewContext(ctx, cfg.Peer)
	}
	t := &Tunnel{
		cfg:       cfg,
		local:     cfg.Settings.WithDefaults(),
		tr:        tr,
		log:       cfg.Logger,
		ctx:       ctx,
		cancelCtx: cancel,
		done:      make(chan struct{}),
		helloC:    make(chan struct{}),
		registerC: make(chan struct{}),
		streams:   make(map[uint64]*stream),
		idle:      make(chan struct{}),
	}
	if cfg.Side == OperatorSide {
		t.nextID = 1
	} else {
		t.nextID = 2
	}
	t.lastRecv.Store(time.Now().UnixNano())
	t.w = newWriter(t, tr)
	hello := helloFrame(t.local)
	if cfg.Side == OperatorSide {
		hello.GetHello().ReplicaId = cfg.Replica.ID
		hello.GetHello().ReplicaCount = uint32(cfg.Replica.Count)
	}
	t.w.control(hello) // the plugin registers once the operator's Hello is in (spec 4.1)
	if !cfg.ReadInCaller {
		go t.readLoop()
	}
	return t
}

// Done is closed when the tunnel has closed.
func (t *Tunnel) Done() <-chan struct{} { return t.done }

// Err is why the tunnel closed: nil after a clean drain, else a status error.
func (t *Tunnel) Err() error {
	select {
	case <-t.done:
	default:
		return nil
	}
	if t.err.Code() == codes.OK {
		return nil
	}
	return t.err.Err()
}

// Wait closes nothing; it waits until the tunnel has closed and its write
// loop has stopped, at most writerStopTimeout after the close (a write can
// stay blocked on a peer that does not read until the transport ends).
func (t *Tunnel) Wait() {
	<-t.done
	t.w.wait(writerStopTimeout)
}

// Version is the negotiated protocol version, 0 before the Hello exchange.
func (t *Tunnel) Version() uint32 {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.version
}

// Close ends the tunnel at once; calls in flight fail with UNAVAILABLE.
func (t *Tunnel) Close(st *status.Status) { t.close(st) }

func (t *Tunnel) close(st *status.Status) {
	t.closeOnce.Do(func() {
		t.mu.Lock()
		if t.failure != nil {
			// This side decided to end the tunnel: that is why it closed,
			// even if the transport ended first.
			st = t.failure
		}
		t.err = st
		streams := make([]*stream, 0, len(t.streams))
		for _, s := range t.streams {
			streams = append(streams, s)
		}
		t.streams = map[uint64]*stream{}
		t.stopHeartbeatLocked()
		t.mu.Unlock()
		callErr := status.New(codes.Unavailable, "plugin tunnel closed")
		if st.Code() != codes.OK {
			callErr = status.New(codes.Unavailable, "plugin tunnel closed: "+st.Message())
		}
		for _, s := range streams {
			s.tunnelClosed(callErr)
		}
		close(t.done)
		t.cancelCtx()
		// OnClose ends the stream to unblock a read; when the read loop
		// itself saw the stream end, the handler returns its own status
		// (a RegisterReject's, say), which a write here would replace.
		if t.cfg.OnClose != nil && !t.readEnded.Load() {
			t.cfg.OnClose(st)
		}
		if st.Code() != codes.OK {
			t.log.V(1).Info("tunnel closed", "code", st.Code(), "reason", st.Message())
		}
	})
}

// fail reports a tunnel-level error to the peer with GoAway and closes.
func (t *Tunnel) fail(st *status.Status) {
	if t.leave(st) {
		t.log.Info("tunnel protocol error", "code", st.Code(), "reason", st.Message())
	}
}

// leave sends GoAway with st, what is queued, and closes the tunnel with st,
// without waiting for streams. It reports false when already leaving.
func (t *Tunnel) leave(st *status.Status) bool {
	t.mu.Lock()
	first := t.failure == nil
	if first {
		t.failure = st
		t.goingAway = true // no new streams either way
	}
	last := t.lastPeerID
	t.mu.Unlock()
	if !first {
		return false
	}
	t.w.control(goAwayFrame(st, last))
	t.w.flush()
	time.AfterFunc(writerStopTimeout, func() { t.close(st) })
	return true
}

// closeFlushed is called by the write loop once a flush has sent everything.
func (t *Tunnel) closeFlushed() {
	t.mu.Lock()
	st := t.failure
	t.mu.Unlock()
	if st == nil {
		st = status.New(codes.OK, "drained")
	}
	if t.cfg.Side == PluginSide {
		// The operator answers our CloseSend by ending the stream; the read
		// loop closes the tunnel then. Do not wait for it forever.
		time.AfterFunc(writerStopTimeout, func() { t.close(st) })
		return
	}
	t.close(st)
}

// GoAway tells the peer that this side takes and makes no new calls on this
// tunnel. Calls in flight go on.
func (t *Tunnel) GoAway(reason *status.Status) {
	t.mu.Lock()
	sent := t.goingAway
	t.goingAway = true // from here on, handleOpen refuses every id above last
	last := t.lastPeerID
	t.mu.Unlock()
	if !sent {
		t.w.control(goAwayFrame(reason, last))
	}
}

// Drain sends GoAway, waits until no call is in flight or ctx ends, then
// closes the tunnel after flushing what is queued. It returns when the
// tunnel is closed.
func (t *Tunnel) Drain(ctx context.Context, reason *status.Status) {
	t.GoAway(reason)
	for {
		t.mu.Lock()
		n, idle := len(t.streams), t.idle
		t.mu.Unlock()
		if n == 0 {
			break
		}
		select {
		case <-idle:
			continue
		case <-t.done:
			return
		case <-ctx.Done():
			t.close(status.New(codes.Unavailable, "drain timeout: "+reason.Message()))
			return
		}
	}
	t.w.flush()
	select {
	case <-t.done:
	case <-ctx.Done():
		t.close(status.New(codes.Unavailable, "drain timeout: "+reason.Message()))
	}
}

// InFlight is the number of open streams.
func (t *Tunnel) InFlight() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.streams)
}

// Accepting reports whether new calls may be opened on this tunnel: it is
// registered, neither side has sent GoAway, and it is not closed.
func (t *Tunnel) Accepting() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.phase == phaseReady && !t.goingAway && !t.peerGoAway && t.err == nil
}

// releaseSlot frees a stream's concurrency slot, once. A handler frees it
// before it queues its StreamClose (spec 6.7), so that a caller reusing the
// slot at once is never refused.
func (t *Tunnel) releaseSlot(s *stream) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.releaseSlotLocked(s)
}

func (t *Tunnel) releaseSlotLocked(s *stream) {
	if s.slotFreed || t.streams[s.id] != s {
		return
	}
	s.slotFreed = true
	if !s.caller {
		t.handling--
	} else if t.slots != nil {
		<-t.slots
	}
}

// removeStream forgets a finished stream, freeing its slot if not yet
// done. A handler calls it only once its last frames are queued: a drain
// waits for the tunnel to have no stream, then flushes the queues, and
// must find those frames there.
func (t *Tunnel) removeStream(s *stream) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.streams[s.id] != s {
		return
	}
	t.releaseSlotLocked(s)
	delete(t.streams, s.id)
	if len(t.streams) == 0 {
		close(t.idle)
		t.idle = make(chan struct{})
	}
}

// preRegistrationBatch is the batch limit before registration (spec 3.3).
const preRegistrationBatch = 64 << 10

// recvLimit is the size above which the next batch is refused undecoded:
// 64 KiB at the operator until it has accepted the registration, nothing
// more once the tunnel is failing.
func (t *Tunnel) recvLimit() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	switch {
	case t.failure != nil:
		return 1
	case t.cfg.Side == OperatorSide && t.phase != phaseReady:
		return preRegistrationBatch
	}
	return 0
}

// ReadLoop reads and acts on the peer's frames until the transport ends,
// then closes the tunnel. Only with Config.ReadInCaller, once.
func (t *Tunnel) ReadLoop() { t.readLoop() }

func (t *Tunnel) readLoop() {
	for {
		b, err := t.tr.Recv(t.recvLimit)
		if err != nil {
			t.readEnded.Store(true) // the stream has ended: OnClose need not end it
			st := t.transportStatus(err)
			t.mu.Lock()
			if t.peerGoAway && errors.Is(err, io.EOF) {
				st = status.New(codes.OK, "peer drained") // the end it announced
			}
			t.mu.Unlock()
			t.close(st)
			return
		}
		t.lastRecv.Store(time.Now().UnixNano())
		// After a tunnel error, frames are no longer acted on; the loop
		// keeps reading until the transport ends with the tunnel.
		switch {
		case b.tooLarge > 0:
			if t.failing() {
				continue
			}
			t.fail(status.Newf(codes.ResourceExhausted, "batch of %d bytes before registration: the limit is %d", b.tooLarge, preRegistrationBatch))
			continue
		case b.tooMany:
			t.fail(status.New(codes.ResourceExhausted, errTooManyFrames.Error()))
			continue
		}
		for i, in := range b.frames {
			if t.failing() {
				for _, rest := range b.frames[i:] {
					freeBuffer(rest.buf)
				}
				break
			}
			if st := t.handleFrame(in.f, in.buf); st != nil {
				t.fail(st)
			}
		}
	}
}

// failing reports a tunnel error being reported to the peer.
func (t *Tunnel) failing() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.failure != nil
}

// transportStatus describes the end of the transport for a person reading
// a call's error or a log: a clean end is "peer closed the tunnel"; a
// connection that broke is UNAVAILABLE "connection to the plugin lost"
// (or the operator), with gRPC's detail when it says more than that the
// stream's context ended, which on the operator's side is what a vanished
// plugin looks like and reads as if the caller had cancelled.
func (t *Tunnel) transportStatus(err error) *status.Status {
	st, ok := status.FromError(err)
	switch {
	case errors.Is(err, io.EOF), ok && st.Code() == codes.OK:
		return status.New(codes.Unavailable, "peer closed the tunnel")
	case ok && st.Code() == codes.ResourceExhausted:
		return st // a batch over the receive limit: the peer's fault, said as it is
	case ok && (st.Code() == codes.Unauthenticated || st.Code() == codes.PermissionDenied):
		return st // the operator refused the tunnel's credentials: a plugin must see why
	}
	peerName := "plugin"
	if t.cfg.Side == PluginSide {
		peerName = "operator"
	}
	lost := "connection to the " + peerName + " lost"
	switch {
	case errors.Is(err, context.Canceled), ok && st.Code() == codes.Canceled:
		return status.New(codes.Unavailable, lost)
	case !ok:
		return status.New(codes.Unavailable, lost+": "+err.Error())
	}
	return status.New(codes.Unavailable, lost+": "+st.Message())
}

// handleFrame acts on one frame, taking over buf (the buffer behind a
// message frame's data, if set). A non-nil result is a violation of the
// tunnel itself; stream-level violations are answered on their stream.
func (t *Tunnel) handleFrame(f *pb.Frame, buf mem.Buffer) *status.Status {
	if _, ok := f.GetKind().(*pb.Frame_Message); !ok && buf != nil {
		buf.Free() // only a message frame's data is kept
		buf = nil
	}
	if f.GetStreamId() == 0 {
		freeBuffer(buf) // a message frame on stream 0 is an error below
		return t.handleTunnelFrame(f)
	}
	switch f.GetKind().(type) {
	case *pb.Frame_Open, *pb.Frame_Headers, *pb.Frame_Message, *pb.Frame_HalfClose, *pb.Frame_Cancel, *pb.Frame_Close, *pb.Frame_WindowUpdate:
	case nil:
		return nil // a frame kind from a later version: ignored
	default:
		return status.Newf(codes.Internal, "tunnel frame %s on stream %d", kindName(f), f.GetStreamId())
	}
	t.mu.Lock()
	ready := t.phase == phaseReady
	s := t.streams[f.GetStreamId()]
	t.mu.Unlock()
	if !ready {
		freeBuffer(buf)
		return status.Newf(codes.Internal, "stream frame %s before registration", kindName(f))
	}
	if o, ok := f.GetKind().(*pb.Frame_Open); ok {
		return t.handleOpen(f.GetStreamId(), o.Open)
	}
	if s == nil {
		freeBuffer(buf)
		t.orphan(f)
		return nil
	}
	var st *status.Status
	switch k := f.GetKind().(type) {
	case *pb.Frame_Headers:
		st = s.onHeaders(k.Headers)
	case *pb.Frame_Message:
		st = s.onMessage(k.Message, buf)
	case *pb.Frame_HalfClose:
		st = s.onHalfClose()
	case *pb.Frame_Cancel:
		st = s.onCancel(k.Cancel)
	case *pb.Frame_Close:
		st = s.onClose(k.Close)
	case *pb.Frame_WindowUpdate:
		st = s.onWindowUpdate(k.WindowUpdate)
	}
	if st != nil {
		t.log.V(1).Info("stream protocol error", "stream", s.id, "method", s.method, "reason", st.Message())
		s.abort(st)
	}
	return nil
}

// ownID reports whether this side opens streams with id's parity.
func (t *Tunnel) ownID(id uint64) bool {
	return (id%2 == 1) == (t.cfg.Side == OperatorSide)
}

// orphan answers a frame for a stream that is not open. Frames for streams
// that ended are expected (the peer had not heard yet) and ignored; frames
// for ids never opened are answered with an abort on that id. An abort is
// never answered with another.
func (t *Tunnel) orphan(f *pb.Frame) {
	id := f.GetStreamId()
	t.mu.Lock()
	var known bool
	if t.ownID(id) {
		known = id < t.nextID
	} else {
		known = id <= t.lastPeerID
	}
	t.mu.Unlock()
	switch f.GetKind().(type) {
	case *pb.Frame_Cancel, *pb.Frame_Close:
		return
	}
	if known {
		return
	}
	st := status.Newf(codes.Internal, "frame for unknown stream %d", id)
	if t.ownID(id) {
		t.w.control(cancelFrame(id, st))
	} else {
		t.w.control(closeFrame(id, st, nil))
	}
}

func (t *Tunnel) handleTunnelFrame(f *pb.Frame) *status.Status {
	switch k := f.GetKind().(type) {
	case *pb.Frame_Hello:
		return t.onHello(k.Hello)
	case *pb.Frame_Register:
		return t.onRegister(k.Register)
	case *pb.Frame_RegisterAck:
		return t.onRegisterAnswer(k.RegisterAck, nil)
	case *pb.Frame_RegisterReject:
		st := statusFromProto(k.RegisterReject.GetStatus(), codes.PermissionDenied)
		if st.Code() == codes.OK {
			st = status.New(codes.PermissionDenied, "registration rejected: "+st.Message())
		}
		return t.onRegisterAnswer(nil, st)
	case *pb.Frame_Ping:
		t.w.queuePong(k.Ping.GetNonce())
	case *pb.Frame_Pong:
		// Any frame proves the peer alive; lastRecv is already updated.
	case *pb.Frame_GoAway:
		reason := statusFromProto(k.GoAway.GetReason(), codes.Unavailable)
		t.mu.Lock()
		t.peerGoAway = true
		var crossed []*stream
		if k.GoAway.LastStreamId != nil {
			for id, s := range t.streams {
				if s.caller && id > k.GoAway.GetLastStreamId() {
					crossed = append(crossed, s)
				}
			}
		}
		t.mu.Unlock()
		for _, s := range crossed {
			s.refusedByPeer()
		}
		if c := reason.Code(); c != codes.OK && c != codes.Unavailable {
			t.log.Info("peer reported a tunnel error", "code", c, "reason", reason.Message())
		}
		if t.cfg.OnGoAway != nil {
			t.cfg.OnGoAway(reason)
		}
	case nil:
		// A frame kind from a later version: ignored.
	default:
		return status.Newf(codes.Internal, "stream frame %s on stream 0", kindName(f))
	}
	return nil
}

func (t *Tunnel) onHello(h *pb.Hello) *status.Status {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.phase != phaseHello {
		return status.New(codes.Internal, "second hello")
	}
	v, ok := negotiateVersion(h)
	if !ok {
		return status.Newf(codes.FailedPrecondition, "no common protocol version: peer speaks %d-%d, this side %d-%d",
			h.GetMinVersion(), h.GetMaxVersion(), MinVersion, MaxVersion)
	}
	ps, err := settingsFromProto(h.GetSettings())
	if err != nil {
		return status.New(codes.InvalidArgument, "bad settings: "+err.Error())
	}
	t.version, t.peer, t.phase = v, ps, phaseRegister
	t.chunk = min(maxChunkSize, ps.MaxBatchSize-batchReserve-frameOverhead)
	t.slots = make(chan struct{}, ps.MaxConcurrentStreams)
	close(t.helloC)
	if t.err == nil {
		t.startHeartbeatLocked()
	}
	if t.cfg.Side == PluginSide {
		if len(h.GetReplicaId()) > maxReplicaID {
			return status.Newf(codes.InvalidArgument, "bad hello: replica id longer than %d bytes", maxReplicaID)
		}
		t.peerReplica = Replica{ID: h.GetReplicaId(), Count: int(min(h.GetReplicaCount(), 1<<16))}
		go t.register(t.peerReplica) // off the read loop's lock
	}
	return nil
}

// maxReplicaID bounds Hello.replica_id (spec 4.7).
const maxReplicaID = 253

// register sends the plugin's Register, unless BeforeRegister refuses the
// operator replica the tunnel reached.
func (t *Tunnel) register(r Replica) {
	if t.cfg.BeforeRegister != nil {
		if st := t.cfg.BeforeRegister(r); st != nil {
			t.leave(st)
			return
		}
	}
	t.w.control(&pb.Frame{Kind: &pb.Frame_Register{Register: t.cfg.Register}})
}

// PeerReplica is what the operator's Hello said of the operator process
// (plugin side); zero before it arrives.
func (t *Tunnel) PeerReplica() Replica {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.peerReplica
}

func (t *Tunnel) onRegister(r *pb.Register) *status.Status {
	t.mu.Lock()
	defer t.mu.Unlock()
	switch {
	case t.cfg.Side != OperatorSide:
		return status.New(codes.Internal, "register sent to a plugin")
	case t.phase != phaseRegister || t.registration != nil:
		return status.New(codes.Internal, "register out of order")
	}
	t.registration = r
	close(t.registerC)
	return nil
}

func (t *Tunnel) onRegisterAnswer(ack *pb.RegisterAck, reject *status.Status) *status.Status {
	t.mu.Lock()
	switch {
	case t.cfg.Side != PluginSide:
		t.mu.Unlock()
		return status.New(codes.Internal, "registration answer sent to the operator")
	case t.phase != phaseRegister:
		t.mu.Unlock()
		return status.New(codes.Internal, "registration answer out of order")
	}
	if reject != nil {
		t.mu.Unlock()
		t.close(reject)
		return nil
	}
	t.ack, t.phase = ack, phaseReady
	close(t.registerC)
	t.w.setMaxBatch(t.peer.MaxBatchSize) // registered: the peer's limit applies (spec 3.3)
	t.mu.Unlock()
	return nil
}

// Registration waits for the plugin's Register (operator side). On timeout
// or failure the tunnel is closed and the error returned.
func (t *Tunnel) Registration(ctx context.Context) (*pb.Register, error) {
	select {
	case <-t.registerC:
		t.mu.Lock()
		defer t.mu.Unlock()
		return t.registration, nil
	case <-t.done:
		select {
		case <-t.registerC:
			// A Register that came before the stream ended still gets its
			// answer, as the handler's status (a RegisterReject's, say).
			t.mu.Lock()
			defer t.mu.Unlock()
			return t.registration, nil
		default:
		}
		return nil, t.closedErr()
	case <-ctx.Done():
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			st := status.New(codes.DeadlineExceeded, "no registration before the handshake timeout")
			t.fail(st)
			return nil, st.Err()
		}
		st := status.New(codes.Unavailable, "plugin left during the handshake")
		t.close(st)
		return nil, st.Err()
	}
}

// Accept answers the registration (operator side): from now on calls flow.
//
// publish runs once calls may be opened and before the ack can leave, so
// that the operator can list the tunnel (in its registry) before the plugin
// learns it is registered: a plugin whose registration is answered is
// callable. The ack is queued ahead of any StreamOpen (spec 3.2).
func (t *Tunnel) Accept(instanceID string, publish func()) {
	t.w.pause()
	defer t.w.resume()
	t.mu.Lock()
	t.phase = phaseReady
	t.w.push(&pb.Frame{Kind: &pb.Frame_RegisterAck{RegisterAck: &pb.RegisterAck{InstanceId: instanceID}}})
	t.mu.Unlock()
	t.w.setMaxBatch(t.peer.MaxBatchSize) // after the ack: that batch stays within 64 KiB (spec 3.3)
	if publish != nil {
		publish()
	}
}

// Reject refuses the registration (operator side) and closes the tunnel
// once the answer is sent.
func (t *Tunnel) Reject(st *status.Status) {
	st = fitStatus(st, preRegistrationBatch-batchReserve) // the answer is sent before registration (spec 3.3)
	t.mu.Lock()
	t.failure = st
	t.mu.Unlock()
	t.w.control(&pb.Frame{Kind: &pb.Frame_RegisterReject{RegisterReject: &pb.RegisterReject{Status: st.Proto()}}})
	t.w.flush()
	time.AfterFunc(writerStopTimeout, func() { t.close(st) })
}

// Registered waits for the operator's answer (plugin side): the ack, or the
// rejection's status as an error.
func (t *Tunnel) Registered(ctx context.Context) (*pb.RegisterAck, error) {
	select {
	case <-t.registerC:
		t.mu.Lock()
		defer t.mu.Unlock()
		return t.ack, nil
	case <-t.done:
		return nil, t.closedErr()
	case <-ctx.Done():
		return nil, status.FromContextError(ctx.Err()).Err()
	}
}

// closedErr is the error of a closed tunnel, never nil.
func (t *Tunnel) closedErr() error {
	if err := t.Err(); err != nil {
		return err
	}
	return status.Error(codes.Unavailable, "plugin tunnel closed")
}

func (t *Tunnel) handleOpen(id uint64, o *pb.StreamOpen) *status.Status {
	if t.ownID(id) {
		return status.Newf(codes.Internal, "peer opened stream %d with this side's parity", id)
	}
	t.mu.Lock()
	if id <= t.lastPeerID {
		live := t.streams[id]
		t.mu.Unlock()
		st := status.Newf(codes.Internal, "stream id %d reused", id)
		if live != nil {
			live.abort(st)
		} else {
			t.w.control(closeFrame(id, st, nil))
		}
		return nil
	}
	t.lastPeerID = id
	var refuse *status.Status
	switch {
	case t.cfg.Handler == nil:
		refuse = status.New(codes.Unimplemented, "this side of the tunnel serves no calls")
	case t.goingAway:
		refuse = status.New(codes.Unavailable, "tunnel is draining")
	case t.handling >= t.local.MaxConcurrentStreams:
		refuse = status.Newf(codes.ResourceExhausted, "more than %d concurrent streams", t.local.MaxConcurrentStreams)
	case !validMethod(o.GetMethod()):
		refuse = status.Newf(codes.Internal, "malformed method name %q", o.GetMethod())
	}
	md, err := decodeMetadata(o.GetMetadata())
	if refuse == nil && err != nil {
		refuse = status.New(codes.Internal, "malformed metadata: "+err.Error())
	}
	var timeout time.Duration
	if d := o.GetTimeout(); refuse == nil && d != nil {
		if d.CheckValid() != nil || d.AsDuration() <= 0 {
			refuse = status.New(codes.Internal, "malformed timeout")
		}
		timeout = d.AsDuration()
	}
	if refuse != nil {
		t.mu.Unlock()
		t.w.control(closeFrame(id, refuse, nil))
		return nil
	}
	s := newStream(t, id, o.GetMethod(), false, nil)
	t.streams[id] = s
	t.handling++
	t.mu.Unlock()
	t.cfg.Handler.start(s, md, timeout)
	return nil
}
