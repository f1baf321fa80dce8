package conformance

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	pb "github.com/guilhem/operator-plugin-framework/go/gen/pluginframework/v1"
)

// The raw-frame mode: the runner speaks the tunnel protocol frame by frame,
// with nothing of the framework's engine, as a raw plugin against the
// framework's server or as a raw operator against the plugin under test.
// It sends exactly the frames a case lists, valid or not, and checks what
// comes back.

// frameKinds maps the Frame oneof names to their field descriptors.
var frameKinds = func() map[string]protoreflect.FieldDescriptor {
	out := map[string]protoreflect.FieldDescriptor{}
	oneof := (&pb.Frame{}).ProtoReflect().Descriptor().Oneofs().ByName("kind")
	for i := range oneof.Fields().Len() {
		fd := oneof.Fields().Get(i)
		out[string(fd.Name())] = fd
	}
	return out
}()

// rawCodec passes *[]byte and []byte through untouched, so that the raw
// peer can send malformed batches and parse what it receives itself.
type rawCodec struct{}

func (rawCodec) Name() string { return "proto" }

func (rawCodec) Marshal(v any) (mem.BufferSlice, error) {
	switch b := v.(type) {
	case []byte:
		return mem.BufferSlice{mem.SliceBuffer(b)}, nil
	case proto.Message:
		data, err := proto.Marshal(b)
		if err != nil {
			return nil, err
		}
		return mem.BufferSlice{mem.SliceBuffer(data)}, nil
	}
	return nil, fmt.Errorf("raw codec: cannot marshal %T", v)
}

func (rawCodec) Unmarshal(data mem.BufferSlice, v any) error {
	switch b := v.(type) {
	case *[]byte:
		*b = data.Materialize()
		return nil
	case proto.Message:
		return proto.Unmarshal(data.Materialize(), b)
	}
	return fmt.Errorf("raw codec: cannot unmarshal into %T", v)
}

var _ encoding.CodecV2 = rawCodec{}

// peerSettings are the settings the peer announced in its Hello, with the
// protocol defaults for unset fields.
type peerSettings struct {
	MaxMessageSize       int
	InitialWindowSize    int
	MaxConcurrentStreams int
	MaxBatchSize         int
}

func settingsOf(s *pb.Settings) peerSettings {
	or := func(v uint32, def int) int {
		if v == 0 {
			return def
		}
		return int(v)
	}
	return peerSettings{
		MaxMessageSize:       or(s.GetMaxMessageSize(), 4<<20),
		InitialWindowSize:    or(s.GetInitialWindowSize(), 2<<20),
		MaxConcurrentStreams: or(s.GetMaxConcurrentStreams(), 100),
		MaxBatchSize:         or(s.GetMaxBatchSize(), 4<<20),
	}
}

// rawConn is one tunnel seen frame by frame.
type rawConn struct {
	side string // "plugin" when the runner plays the plugin, "operator" otherwise
	logf func(format string, args ...any)

	sendMu  sync.Mutex
	sendFn  func(any) error
	closeFn func(*status.Status)

	answerPings atomic.Bool

	mu     sync.Mutex
	queue  []*pb.Frame
	notify chan struct{} // closed and replaced when frames arrive or the stream ends
	peer   *peerSettings
	own    *peerSettings // this side's Hello settings, once sent
	// largest is the largest batch received, in bytes; mostFrames the most
	// frames one held.
	largest, mostFrames int
	// batches counts the batches received.
	batches int
	// taps take the frames of streams the raw caller runs (rawcall.go)
	// instead of the queue.
	taps map[uint64]func(*pb.Frame)
	// maxOpen is the highest stream id this side opened.
	maxOpen uint64
	// flow is the credit of each stream in the peer's direction: what this
	// side granted (its Hello's window and its WindowUpdates) and what the
	// peer's chunks cost (data + 64 each).
	flow       map[uint64]*flowState
	loggedMsgs int            // message frames received, logged up to maxLoggedMessages
	kinds      map[string]int // frames received, by kind, since the start
	// pauseUntil stops the read loop until then (pause_reading), so that
	// the peer's frames pile up in its queues.
	pauseUntil time.Time
	ended      bool
	endErr     error
	endAt      time.Time
	endC       chan struct{} // closed when the stream ends
	// The Connect call as the raw operator received it: its metadata and
	// whether it had a deadline.
	connectMD       metadata.MD
	connectDeadline bool
	// batchesOf lists, per stream, the batches its frames came in.
	batchesOf map[uint64]map[int]bool
}

func newRawConn(side string, logf func(string, ...any), send func(any) error, closeFn func(*status.Status)) *rawConn {
	rc := &rawConn{side: side, logf: logf, sendFn: send, closeFn: closeFn, notify: make(chan struct{}), endC: make(chan struct{}), taps: map[uint64]func(*pb.Frame){}, flow: map[uint64]*flowState{}, kinds: map[string]int{}, batchesOf: map[uint64]map[int]bool{}}
	rc.answerPings.Store(true)
	return rc
}

// maxLoggedMessages bounds the message frames a case's log shows: cases
// that receive thousands would bury the rest.
const maxLoggedMessages = 200

// flowState is one stream's credit towards this side.
type flowState struct {
	granted, spent int64
	chunks         int
	overrun        string // the first chunk that cost more than the credit left
}

// flowOf returns a stream's credit record. Called with rc.mu held.
func (rc *rawConn) flowOf(id uint64) *flowState {
	fs := rc.flow[id]
	if fs == nil {
		window := int64(2 << 20)
		if rc.own != nil {
			window = int64(rc.own.InitialWindowSize)
		}
		fs = &flowState{granted: window}
		rc.flow[id] = fs
	}
	return fs
}

// waitPause holds the read loop while reading is paused.
func (rc *rawConn) waitPause() {
	for {
		rc.mu.Lock()
		d := time.Until(rc.pauseUntil)
		rc.mu.Unlock()
		if d <= 0 {
			return
		}
		time.Sleep(min(d, 20*time.Millisecond)) // a step may end the pause early
	}
}

// read runs the receive loop over recv until the stream ends.
func (rc *rawConn) read(recv func(*[]byte) error) {
	for {
		rc.waitPause()
		var b []byte
		err := recv(&b)
		if err != nil {
			rc.mu.Lock()
			rc.ended, rc.endErr, rc.endAt = true, err, time.Now()
			close(rc.endC)
			close(rc.notify)
			rc.notify = make(chan struct{})
			rc.mu.Unlock()
			rc.logf("raw %s: stream ended: %v", rc.side, err)
			return
		}
		rc.mu.Lock()
		rc.largest = max(rc.largest, len(b))
		rc.mu.Unlock()
		var batch pb.ConnectResponse // same layout as ConnectRequest
		if err := proto.Unmarshal(b, &batch); err != nil {
			rc.logf("raw %s: malformed batch from the peer: %v", rc.side, err)
			continue
		}
		rc.mu.Lock()
		rc.mostFrames = max(rc.mostFrames, len(batch.GetFrames()))
		rc.batches++
		rc.mu.Unlock()
		for _, f := range batch.GetFrames() {
			rc.mu.Lock()
			rc.kinds[kindOf(f)]++
			if id := f.GetStreamId(); id != 0 {
				if rc.batchesOf[id] == nil {
					rc.batchesOf[id] = map[int]bool{}
				}
				rc.batchesOf[id][rc.batches] = true
			}
			tap := rc.taps[f.GetStreamId()]
			if m := f.GetMessage(); m != nil && f.GetStreamId() != 0 {
				fs := rc.flowOf(f.GetStreamId())
				cost := int64(len(m.GetData())) + 64
				if left := fs.granted - fs.spent; cost > left && fs.overrun == "" {
					fs.overrun = fmt.Sprintf("chunk %d (%d bytes of data) cost %d with %d credit left (%d granted, %d spent before it)", fs.chunks+1, len(m.GetData()), cost, left, fs.granted, fs.spent)
				}
				fs.spent += cost
				fs.chunks++
			}
			rc.mu.Unlock()
			quiet := false
			if f.GetMessage() != nil {
				rc.mu.Lock()
				rc.loggedMsgs++
				quiet = rc.loggedMsgs > maxLoggedMessages
				if rc.loggedMsgs == maxLoggedMessages+1 {
					rc.logf("raw %s: (the next message frames are not logged)", rc.side)
				}
				rc.mu.Unlock()
			}
			if tap != nil && f.GetStreamId() != 0 {
				tap(f)
				continue
			}
			if !quiet {
				rc.logf("raw %s: received %s", rc.side, describeFrame(f))
			}
			if p := f.GetPing(); p != nil && rc.answerPings.Load() {
				_ = rc.sendFrames([]*pb.Frame{{Kind: &pb.Frame_Pong{Pong: &pb.Pong{Nonce: p.GetNonce()}}}})
			}
			rc.mu.Lock()
			if h := f.GetHello(); h != nil && rc.peer == nil {
				ps := settingsOf(h.GetSettings())
				rc.peer = &ps
			}
			rc.queue = append(rc.queue, f)
			close(rc.notify)
			rc.notify = make(chan struct{})
			rc.mu.Unlock()
		}
	}
}

func (rc *rawConn) sendFrames(frames []*pb.Frame) error {
	rc.mu.Lock()
	for _, f := range frames {
		if h := f.GetHello(); h != nil && rc.own == nil {
			ps := settingsOf(h.GetSettings())
			rc.own = &ps
		}
		if f.GetOpen() != nil {
			rc.maxOpen = max(rc.maxOpen, f.GetStreamId())
		}
		if w := f.GetWindowUpdate(); w != nil && f.GetStreamId() != 0 {
			rc.flowOf(f.GetStreamId()).granted += int64(w.GetIncrement())
		}
	}
	rc.mu.Unlock()
	b, err := proto.Marshal(&pb.ConnectRequest{Frames: frames})
	if err != nil {
		return err
	}
	return rc.sendBytes(b)
}

func (rc *rawConn) sendBytes(b []byte) error {
	rc.sendMu.Lock()
	defer rc.sendMu.Unlock()
	return rc.sendFn(b)
}

// peerSettings returns the peer's settings, once its Hello arrived.
func (rc *rawConn) peerSettings() (peerSettings, bool) {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	if rc.peer == nil {
		return peerSettings{}, false
	}
	return *rc.peer, true
}

// resolve evaluates "peer.<setting>[/D][+-N]" (D divides first, with
// integer division) and plain sizes.
func (rc *rawConn) resolve(expr string) (int, error) {
	rest, ok := strings.CutPrefix(strings.TrimSpace(expr), "peer.")
	if !ok {
		return parseSize(expr)
	}
	name, delta, div := rest, 0, 1
	if i := strings.IndexAny(rest, "+-"); i > 0 {
		d, err := parseSize(rest[i+1:])
		if err != nil {
			return 0, fmt.Errorf("bad expression %q", expr)
		}
		if rest[i] == '-' {
			d = -d
		}
		name, delta = rest[:i], d
	}
	if i := strings.Index(name, "/"); i > 0 {
		d, err := strconv.Atoi(strings.TrimSpace(name[i+1:]))
		if err != nil || d <= 0 {
			return 0, fmt.Errorf("bad expression %q", expr)
		}
		name, div = name[:i], d
	}
	ps, ok := rc.peerSettings()
	if !ok {
		return 0, fmt.Errorf("%q: the peer's Hello has not arrived", expr)
	}
	var v int
	switch strings.TrimSpace(name) {
	case "max_message_size":
		v = ps.MaxMessageSize
	case "initial_window_size":
		v = ps.InitialWindowSize
	case "max_concurrent_streams":
		v = ps.MaxConcurrentStreams
	case "max_batch_size":
		v = ps.MaxBatchSize
	default:
		return 0, fmt.Errorf("%q: unknown setting", expr)
	}
	return v/div + delta, nil
}

// resolveWant replaces the "peer.<setting>..." strings of a match with
// their values.
func (rc *rawConn) resolveWant(v any) (any, error) {
	switch w := v.(type) {
	case string:
		if strings.HasPrefix(strings.TrimSpace(w), "peer.") {
			return rc.resolve(w)
		}
	case map[string]any:
		out := make(map[string]any, len(w))
		for k, e := range w {
			r, err := rc.resolveWant(e)
			if err != nil {
				return nil, err
			}
			out[k] = r
		}
		return out, nil
	case []any:
		out := make([]any, len(w))
		for i, e := range w {
			r, err := rc.resolveWant(e)
			if err != nil {
				return nil, err
			}
			out[i] = r
		}
		return out, nil
	}
	return v, nil
}

// buildFrame makes a frame from its case description.
func (rc *rawConn) buildFrame(spec FrameSpec) (*pb.Frame, error) {
	kind, err := frameKind(spec, frameSpecKeys...)
	if err != nil {
		return nil, err
	}
	f := &pb.Frame{}
	if s, ok := spec["stream"]; ok {
		id, err := toInt(s, rc.resolve)
		if err != nil {
			return nil, fmt.Errorf("stream: %w", err)
		}
		f.StreamId = uint64(id)
	}
	if kind == "unknown" {
		// A frame kind from a later protocol version: a field this version
		// does not know.
		u, _ := spec["unknown"].(map[string]any)
		num, err := toInt(u["field"], rc.resolve)
		if err != nil || num < 1 {
			return nil, fmt.Errorf("unknown: want {field: N, size: BYTES} or {field: N, batch_size: BYTES}")
		}
		size := 0
		if v, ok := u["size"]; ok {
			if size, err = toInt(v, rc.resolve); err != nil {
				return nil, fmt.Errorf("unknown size: %w", err)
			}
		}
		return unknownFrame(num, size), nil
	}
	fd := frameKinds[kind]
	m, err := buildMessage(f.ProtoReflect().NewField(fd).Message().Type(), spec[kind], rc.resolve)
	if err != nil {
		return nil, err
	}
	f.ProtoReflect().Set(fd, protoreflect.ValueOfMessage(m.ProtoReflect()))
	return f, nil
}

// frameSpecKeys are the keys of a FrameSpec besides its kind: repeat sends
// the frame that many times.
var frameSpecKeys = []string{"stream", "repeat", "stream_step"}

// buildFrames makes the frames of a send step, repeats expanded. An
// unknown frame with batch_size is padded so that the whole batch encodes
// to exactly that many bytes.
func (rc *rawConn) buildFrames(specs []FrameSpec) ([]*pb.Frame, error) {
	frames, err := rc.expandFrames(specs)
	if err != nil {
		return nil, err
	}
	for i, spec := range specs {
		u, _ := spec["unknown"].(map[string]any)
		bs, ok := u["batch_size"]
		if !ok {
			continue
		}
		want, err := toInt(bs, rc.resolve)
		if err != nil {
			return nil, fmt.Errorf("frame %d: batch_size: %w", i, err)
		}
		num, _ := toInt(u["field"], rc.resolve)
		// The padding's own length prefix grows with it: converge.
		pad := 0
		for range 8 {
			frames[i] = unknownFrame(num, pad)
			got := proto.Size(&pb.ConnectRequest{Frames: frames})
			if got == want {
				return frames, nil
			}
			pad += want - got
			if pad < 0 {
				return nil, fmt.Errorf("frame %d: the batch is already %d bytes, above batch_size %d", i, got, want)
			}
		}
		return nil, fmt.Errorf("frame %d: cannot pad the batch to exactly %d bytes", i, want)
	}
	return frames, nil
}

func unknownFrame(field, size int) *pb.Frame {
	f := &pb.Frame{}
	raw := protowire.AppendTag(nil, protowire.Number(field), protowire.BytesType)
	raw = protowire.AppendBytes(raw, make([]byte, size))
	f.ProtoReflect().SetUnknown(raw)
	return f
}

func (rc *rawConn) expandFrames(specs []FrameSpec) ([]*pb.Frame, error) {
	var out []*pb.Frame
	for i, spec := range specs {
		f, err := rc.buildFrame(spec)
		if err != nil {
			return nil, fmt.Errorf("frame %d: %w", i, err)
		}
		n, step := 1, 0
		if r, ok := spec["repeat"]; ok {
			if n, err = toInt(r, rc.resolve); err != nil || n < 1 {
				return nil, fmt.Errorf("frame %d: repeat wants a positive count", i)
			}
		}
		if r, ok := spec["stream_step"]; ok {
			if step, err = toInt(r, rc.resolve); err != nil || step < 0 {
				return nil, fmt.Errorf("frame %d: stream_step wants a count", i)
			}
		}
		for j := range n {
			if step == 0 {
				out = append(out, f)
				continue
			}
			g := proto.Clone(f).(*pb.Frame)
			g.StreamId += uint64(j * step)
			out = append(out, g)
		}
	}
	return out, nil
}

// takeMatching removes and returns the first queued frame that m matches,
// and describes the others.
func (rc *rawConn) takeMatching(m FrameMatch) (*pb.Frame, []string, error) {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	var others []string
	first, _ := m["first"].(bool)
	for i, f := range rc.queue {
		if first {
			// Only the first frame of the stream may match.
			if id, ok := number(m["stream"]); ok && uint64(id) != f.GetStreamId() {
				continue
			}
		}
		err := matchFrame(m, f)
		if err != nil && first {
			return nil, []string{describeFrame(f) + " (" + err.Error() + ")"}, nil
		}
		if err == nil {
			rc.queue = slices.Delete(rc.queue, i, i+1)
			return f, nil, nil
		}
		others = append(others, describeFrame(f)+" ("+err.Error()+")")
	}
	return nil, others, nil
}

// await waits for a frame matching m.
func (rc *rawConn) await(ctx context.Context, m FrameMatch) (*pb.Frame, error) {
	if r, err := rc.resolveWant(map[string]any(m)); err != nil {
		return nil, err
	} else {
		m = r.(map[string]any)
	}
	within := 3 * time.Second
	if w, ok := m["within"].(string); ok {
		d, err := time.ParseDuration(w)
		if err != nil {
			return nil, err
		}
		within = d
	}
	deadline := time.NewTimer(within)
	defer deadline.Stop()
	for {
		rc.mu.Lock()
		notify, ended, endErr := rc.notify, rc.ended, rc.endErr
		rc.mu.Unlock()
		f, others, err := rc.takeMatching(m)
		if err != nil || f != nil {
			return f, err
		}
		why := ""
		if ended {
			why = fmt.Sprintf("the stream ended (%v)", endErr)
		}
		if why == "" {
			select {
			case <-notify:
				continue
			case <-deadline.C:
				why = fmt.Sprintf("nothing within %v", within)
			case <-ctx.Done():
				why = ctx.Err().Error()
			}
		}
		msg := fmt.Sprintf("no frame matching %s: %s", describeMatch(m), why)
		if len(others) > 0 {
			msg += "; received instead: " + strings.Join(others, "; ")
		}
		return nil, errors.New(msg)
	}
}

// expectSilence checks that no frame of these kinds is queued or arrives
// for d.
func (rc *rawConn) expectSilence(ctx context.Context, d time.Duration, kinds []string, stream uint64) error {
	timer := time.NewTimer(d)
	defer timer.Stop()
	for {
		rc.mu.Lock()
		notify := rc.notify
		if rc.ended {
			err := rc.endErr
			rc.mu.Unlock()
			return fmt.Errorf("the stream ended: %v", err)
		}
		for _, f := range rc.queue {
			if stream != 0 && f.GetStreamId() != stream {
				continue
			}
			if k := kindOf(f); len(kinds) == 0 || slices.Contains(kinds, k) {
				rc.mu.Unlock()
				return fmt.Errorf("got %s, want no %v frame", describeFrame(f), kinds)
			}
		}
		rc.mu.Unlock()
		select {
		case <-notify:
		case <-timer.C:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// awaitEnd waits for the stream to end and returns how.
func (rc *rawConn) awaitEnd(ctx context.Context, within time.Duration) (error, error) {
	timer := time.NewTimer(within)
	defer timer.Stop()
	for {
		rc.mu.Lock()
		notify, ended, endErr := rc.notify, rc.ended, rc.endErr
		rc.mu.Unlock()
		if ended {
			return endErr, nil
		}
		select {
		case <-notify:
		case <-timer.C:
			return nil, fmt.Errorf("the stream did not end within %v", within)
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

func kindOf(f *pb.Frame) string {
	fd := f.ProtoReflect().WhichOneof(f.ProtoReflect().Descriptor().Oneofs().ByName("kind"))
	if fd == nil {
		return "unknown"
	}
	return string(fd.Name())
}

// matchKeys are the keys of a FrameMatch besides the frame kind.
var matchKeys = []string{"stream", "within", "decode", "first"}

// matchFrame reports why f does not match m.
func matchFrame(m FrameMatch, f *pb.Frame) error {
	kind, err := frameKind(m, matchKeys...)
	if err != nil {
		return err
	}
	if got := kindOf(f); got != kind {
		return fmt.Errorf("kind %s", got)
	}
	if s, ok := m["stream"]; ok {
		id, ok := number(s)
		if !ok || uint64(id) != f.GetStreamId() {
			return fmt.Errorf("stream %d", f.GetStreamId())
		}
	}
	fd := frameKinds[kind]
	got := matchable(f.ProtoReflect().Get(fd).Message())
	if typ, ok := m["decode"].(string); ok && kind == "message" {
		mt, err := findType(typ)
		if err != nil {
			return err
		}
		dm := mt.New().Interface()
		if err := proto.Unmarshal(f.GetMessage().GetData(), dm); err != nil {
			return fmt.Errorf("data is no %s: %v", typ, err)
		}
		got.(map[string]any)["value"] = matchable(dm.ProtoReflect())
	}
	want := m[kind]
	if want == nil {
		return nil
	}
	return match(kind, want, got)
}

func describeMatch(m FrameMatch) string {
	kind, _ := frameKind(m, matchKeys...)
	s := kind
	if id, ok := m["stream"]; ok {
		s = fmt.Sprintf("%s on stream %v", kind, id)
	}
	if v := m[kind]; v != nil {
		s += fmt.Sprintf(" %v", v)
	}
	return s
}

// describeFrame prints a frame briefly, message data summarised.
func describeFrame(f *pb.Frame) string {
	kind := kindOf(f)
	var body string
	switch k := f.GetKind().(type) {
	case *pb.Frame_Message:
		body = fmt.Sprintf("size=%d data=%dB", k.Message.GetSize(), len(k.Message.GetData()))
	case nil:
	default:
		fd := frameKinds[kind]
		body = strings.TrimSpace(fmt.Sprint(f.ProtoReflect().Get(fd).Message().Interface()))
	}
	if len(body) > 200 {
		body = body[:200] + "…"
	}
	return fmt.Sprintf("%s[%d]{%s}", kind, f.GetStreamId(), body)
}

// protocolVersion is the version of docs/tunnel-spec.md the cases test.
const protocolVersion = 2

func helloFrame(settings map[string]any, res resolver) (*pb.Frame, error) {
	h := map[string]any{"min_version": protocolVersion, "max_version": protocolVersion}
	if settings != nil {
		h["settings"] = settings
	}
	m, err := buildMessage((&pb.Hello{}).ProtoReflect().Type(), h, res)
	if err != nil {
		return nil, err
	}
	return &pb.Frame{Kind: &pb.Frame_Hello{Hello: m.(*pb.Hello)}}, nil
}

// rawOperator is a gRPC server that hands each Connect stream to the case
// as a rawConn.
type rawOperator struct {
	gs    *grpc.Server
	conns chan *rawConn
	logf  func(string, ...any)
	done  chan struct{}
}

type rawOperatorService struct {
	pb.UnimplementedPluginFrameworkServiceServer
	op *rawOperator
}

func startRawOperator(lis net.Listener, creds credentials.TransportCredentials, logf func(string, ...any)) *rawOperator {
	opts := []grpc.ServerOption{grpc.ForceServerCodecV2(rawCodec{}), grpc.MaxRecvMsgSize(64 << 20)}
	if creds != nil {
		opts = append(opts, grpc.Creds(creds))
	}
	op := &rawOperator{gs: grpc.NewServer(opts...), conns: make(chan *rawConn, 16), logf: logf, done: make(chan struct{})}
	pb.RegisterPluginFrameworkServiceServer(op.gs, &rawOperatorService{op: op})
	go func() {
		defer close(op.done)
		_ = op.gs.Serve(lis)
	}()
	return op
}

func (s *rawOperatorService) Connect(stream grpc.BidiStreamingServer[pb.ConnectRequest, pb.ConnectResponse]) error {
	release := make(chan *status.Status, 1)
	rc := newRawConn("operator", s.op.logf,
		func(v any) error { return stream.SendMsg(v) },
		func(st *status.Status) {
			select {
			case release <- st:
			default:
			}
		})
	rc.connectMD, _ = metadata.FromIncomingContext(stream.Context())
	_, rc.connectDeadline = stream.Context().Deadline()
	readDone := make(chan struct{})
	go func() {
		defer close(readDone)
		rc.read(func(b *[]byte) error { return stream.RecvMsg(b) })
	}()
	select {
	case s.op.conns <- rc:
	default:
		return status.Error(codes.ResourceExhausted, "raw operator: too many tunnels")
	}
	s.op.logf("raw operator: the plugin opened a tunnel")
	select {
	case st := <-release:
		return st.Err()
	case <-stream.Context().Done():
		<-readDone
		return stream.Context().Err()
	}
}

// stop ends every tunnel at once.
func (op *rawOperator) stop() {
	op.gs.Stop()
	<-op.done
}

// dialRaw opens a tunnel to the server at target as a raw plugin.
func dialRaw(ctx context.Context, target string, creds credentials.TransportCredentials, token, subtype string, logf func(string, ...any)) (*rawConn, func(), error) {
	if creds == nil {
		creds = insecure.NewCredentials()
	}
	cc, err := grpc.NewClient(target, grpc.WithTransportCredentials(creds))
	if err != nil {
		return nil, nil, err
	}
	sctx, cancel := context.WithCancel(ctx)
	if token != "" {
		sctx = metadata.AppendToOutgoingContext(sctx, "authorization", "Bearer "+token)
	}
	opts := []grpc.CallOption{grpc.ForceCodecV2(rawCodec{}), grpc.MaxCallRecvMsgSize(64 << 20), grpc.MaxCallSendMsgSize(64 << 20)}
	if subtype != "" {
		opts = append(opts, grpc.CallContentSubtype(subtype))
	}
	cs, err := cc.NewStream(sctx, &grpc.StreamDesc{ServerStreams: true, ClientStreams: true},
		pb.PluginFrameworkService_Connect_FullMethodName, opts...)
	if err != nil {
		cancel()
		cc.Close()
		return nil, nil, err
	}
	rc := newRawConn("plugin", logf,
		func(v any) error { return cs.SendMsg(v) },
		func(st *status.Status) {
			_ = cs.CloseSend()
			if st != nil { // nil: a half-close only
				cancel()
			}
		})
	readDone := make(chan struct{})
	go func() {
		defer close(readDone)
		rc.read(func(b *[]byte) error {
			err := cs.RecvMsg(b)
			if errors.Is(err, io.EOF) {
				return io.EOF
			}
			return err
		})
	}()
	stop := func() {
		cancel()
		<-readDone
		cc.Close()
	}
	return rc, stop, nil
}

// endStatus is how a raw plugin's Connect stream ended, as a status.
func endStatus(err error) *status.Status {
	if errors.Is(err, io.EOF) {
		return status.New(codes.OK, "")
	}
	return status.Convert(err)
}

func decodeB64(s string) ([]byte, error) {
	return base64.StdEncoding.DecodeString(strings.TrimSpace(s))
}

// checkCredit runs a credit step.
func (rc *rawConn) checkCredit(cs *CreditStep) error {
	rc.mu.Lock()
	fs := *rc.flowOf(uint64(cs.Stream))
	rc.mu.Unlock()
	if fs.overrun != "" {
		return fmt.Errorf("stream %d: the peer sent more than its credit: %s", cs.Stream, fs.overrun)
	}
	got := map[string]any{"spent": fs.spent, "chunks": int64(fs.chunks), "left": fs.granted - fs.spent}
	want := map[string]any{}
	for k, v := range map[string]any{"spent": cs.Spent, "chunks": cs.Chunks, "left": cs.Left} {
		if v != nil {
			r, err := rc.resolveWant(v)
			if err != nil {
				return err
			}
			want[k] = r
		}
	}
	if err := match(fmt.Sprintf("stream %d credit", cs.Stream), want, got); err != nil {
		return fmt.Errorf("%w (spent %d in %d chunks, %d granted)", err, fs.spent, fs.chunks, fs.granted)
	}
	return nil
}

// awaitMessage runs an await_message step.
func (rc *rawConn) awaitMessage(ctx context.Context, as *AwaitMessageStep) error {
	within := as.Within.D(3 * time.Second)
	timer := time.NewTimer(within)
	defer timer.Stop()
	id := uint64(as.Stream)
	for {
		rc.mu.Lock()
		notify, ended, endErr := rc.notify, rc.ended, rc.endErr
		var idx []int
		var data []byte
		size, complete := -1, false
		var bad error
		for i, f := range rc.queue {
			m := f.GetMessage()
			if f.GetStreamId() != id || m == nil {
				continue
			}
			d := m.GetData()
			switch {
			case size < 0:
				size = int(m.GetSize())
				if len(d) > size {
					bad = fmt.Errorf("its first chunk has %d bytes, more than its declared size %d", len(d), size)
				}
			case len(d) == 0:
				bad = errors.New("an empty continuation chunk")
			case len(data)+len(d) > size:
				bad = fmt.Errorf("a chunk beyond its declared size %d", size)
			}
			idx = append(idx, i)
			data = append(data, d...)
			if bad != nil || len(data) == size {
				complete = true
				break
			}
		}
		if complete {
			for j := len(idx) - 1; j >= 0; j-- {
				rc.queue = slices.Delete(rc.queue, idx[j], idx[j]+1)
			}
		}
		rc.mu.Unlock()
		if bad != nil {
			return fmt.Errorf("stream %d: the message %v", as.Stream, bad)
		}
		if complete {
			got := map[string]any{"size": int64(size), "chunks": int64(len(idx))}
			w, err := rc.resolveWant(map[string]any{"size": as.Size, "chunks": as.Chunks})
			if err != nil {
				return err
			}
			want := map[string]any{}
			for k, v := range w.(map[string]any) {
				if v != nil {
					want[k] = v
				}
			}
			if err := match(fmt.Sprintf("stream %d message", as.Stream), want, got); err != nil {
				return err
			}
			if as.Decode == "" {
				return nil
			}
			mt, err := findType(as.Decode)
			if err != nil {
				return err
			}
			m := mt.New().Interface()
			if err := proto.Unmarshal(data, m); err != nil {
				return fmt.Errorf("stream %d: the message of %d bytes is no %s: %v", as.Stream, size, as.Decode, err)
			}
			if as.Value == nil {
				return nil
			}
			return match(fmt.Sprintf("stream %d message", as.Stream), as.Value, matchable(m.ProtoReflect()))
		}
		why := ""
		if ended {
			why = fmt.Sprintf("the stream ended (%v)", endErr)
		}
		if why == "" {
			select {
			case <-notify:
				continue
			case <-timer.C:
				why = fmt.Sprintf("nothing complete within %v", within)
			case <-ctx.Done():
				why = ctx.Err().Error()
			}
		}
		return fmt.Errorf("no complete message on stream %d: %s (%d chunks, %d of %d bytes so far)", as.Stream, why, len(idx), len(data), size)
	}
}
