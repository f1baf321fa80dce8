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
	// largest is the largest batch received, in bytes.
	largest int
	ended   bool
	endErr  error
	endAt   time.Time
}

func newRawConn(side string, logf func(string, ...any), send func(any) error, closeFn func(*status.Status)) *rawConn {
	rc := &rawConn{side: side, logf: logf, sendFn: send, closeFn: closeFn, notify: make(chan struct{})}
	rc.answerPings.Store(true)
	return rc
}

// read runs the receive loop over recv until the stream ends.
func (rc *rawConn) read(recv func(*[]byte) error) {
	for {
		var b []byte
		err := recv(&b)
		if err != nil {
			rc.mu.Lock()
			rc.ended, rc.endErr, rc.endAt = true, err, time.Now()
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
		for _, f := range batch.GetFrames() {
			rc.logf("raw %s: received %s", rc.side, describeFrame(f))
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

// resolve evaluates "peer.<setting>[+-N]" and plain sizes.
func (rc *rawConn) resolve(expr string) (int, error) {
	rest, ok := strings.CutPrefix(strings.TrimSpace(expr), "peer.")
	if !ok {
		return parseSize(expr)
	}
	name, delta := rest, 0
	if i := strings.IndexAny(rest, "+-"); i > 0 {
		d, err := strconv.Atoi(rest[i:])
		if err != nil {
			return 0, fmt.Errorf("bad expression %q", expr)
		}
		name, delta = rest[:i], d
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
	return v + delta, nil
}

// buildFrame makes a frame from its case description.
func (rc *rawConn) buildFrame(spec FrameSpec) (*pb.Frame, error) {
	kind, err := frameKind(spec, "stream")
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
			return nil, fmt.Errorf("unknown: want {field: N}")
		}
		raw := protowire.AppendTag(nil, protowire.Number(num), protowire.BytesType)
		raw = protowire.AppendBytes(raw, nil)
		f.ProtoReflect().SetUnknown(raw)
		return f, nil
	}
	fd := frameKinds[kind]
	m, err := buildMessage(f.ProtoReflect().NewField(fd).Message().Type(), spec[kind], rc.resolve)
	if err != nil {
		return nil, err
	}
	f.ProtoReflect().Set(fd, protoreflect.ValueOfMessage(m.ProtoReflect()))
	return f, nil
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
func (rc *rawConn) expectSilence(ctx context.Context, d time.Duration, kinds []string) error {
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
func dialRaw(ctx context.Context, target string, creds credentials.TransportCredentials, token string, logf func(string, ...any)) (*rawConn, func(), error) {
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
	cs, err := cc.NewStream(sctx, &grpc.StreamDesc{ServerStreams: true, ClientStreams: true},
		pb.PluginFrameworkService_Connect_FullMethodName,
		grpc.ForceCodecV2(rawCodec{}), grpc.MaxCallRecvMsgSize(64<<20), grpc.MaxCallSendMsgSize(64<<20))
	if err != nil {
		cancel()
		cc.Close()
		return nil, nil, err
	}
	rc := newRawConn("plugin", logf,
		func(v any) error { return cs.SendMsg(v) },
		func(*status.Status) { _ = cs.CloseSend(); cancel() })
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
