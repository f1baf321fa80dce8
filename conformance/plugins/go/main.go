// Command go is the Go SDK's plugin under test: it serves
// conformance.v1.ConformanceService through the framework's Go client, with
// the settings the conformance runner hands it in OPF_CONFORMANCE_*
// environment variables (docs/conformance.md), and drains on SIGTERM.
package main

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/go-logr/logr/funcr"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/guilhem/operator-plugin-framework/go/client"
	conformancev1 "github.com/guilhem/operator-plugin-framework/go/gen/conformance/v1"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "conformance plugin:", err)
		os.Exit(1)
	}
}

func run() error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()

	log := funcr.New(func(prefix, args string) {
		fmt.Fprintln(os.Stderr, time.Now().Format("15:04:05.000"), prefix, args)
	}, funcr.Options{Verbosity: 1})

	target := os.Getenv("OPF_CONFORMANCE_TARGET")
	name := os.Getenv("OPF_CONFORMANCE_PLUGIN_NAME")
	if target == "" || name == "" {
		return errors.New("OPF_CONFORMANCE_TARGET and OPF_CONFORMANCE_PLUGIN_NAME must be set")
	}
	opts := []client.Option{client.WithLogger(log)}
	if v := os.Getenv("OPF_CONFORMANCE_MAX_MESSAGE_SIZE"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil {
			return fmt.Errorf("OPF_CONFORMANCE_MAX_MESSAGE_SIZE: %w", err)
		}
		opts = append(opts, client.WithMaxMessageSize(n))
	}
	if v := os.Getenv("OPF_CONFORMANCE_DRAIN_TIMEOUT_MS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil {
			return fmt.Errorf("OPF_CONFORMANCE_DRAIN_TIMEOUT_MS: %w", err)
		}
		opts = append(opts, client.WithDrainTimeout(time.Duration(n)*time.Millisecond))
	}
	if ca := os.Getenv("OPF_CONFORMANCE_TLS_CA"); ca != "" {
		opts = append(opts, client.WithTLS(ca, os.Getenv("OPF_CONFORMANCE_TLS_SERVER_NAME")))
	}
	if token := os.Getenv("OPF_CONFORMANCE_TOKEN"); token != "" {
		// The runner asks for the token over its plaintext unix socket too.
		opts = append(opts, client.WithStaticToken(token), client.WithPlaintextToken())
	}

	svc := &service{records: map[string]*conformancev1.Observation{}, recorded: make(chan struct{})}
	c, err := client.New(ctx, name, target, os.Getenv("OPF_CONFORMANCE_PLUGIN_VERSION"),
		&conformancev1.ConformanceService_ServiceDesc, svc, opts...)
	if err != nil {
		return err
	}
	<-ctx.Done()
	log.Info("draining")
	return c.Close()
}

// service implements ConformanceService as conformance.proto documents it.
type service struct {
	conformancev1.UnimplementedConformanceServiceServer

	mu       sync.Mutex
	records  map[string]*conformancev1.Observation
	recorded chan struct{} // closed and replaced whenever a record is added
}

// call tracks one handler's observation.
type call struct {
	ctx    context.Context
	start  time.Time
	obs    *conformancev1.Observation
	digest hash.Hash // Observation.request_digest, fed request by request
}

func newCall(ctx context.Context) *call {
	obs := &conformancev1.Observation{ProcessId: uint32(os.Getpid())}
	obs.Method, _ = grpc.Method(ctx)
	if dl, ok := ctx.Deadline(); ok {
		obs.DeadlineLeft = durationpb.New(time.Until(dl))
	}
	md, _ := metadata.FromIncomingContext(ctx)
	keys := make([]string, 0, len(md))
	for k := range md {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		e := &conformancev1.MetadataEntry{Key: k}
		for _, v := range md[k] {
			e.Values = append(e.Values, []byte(v))
		}
		obs.Metadata = append(obs.Metadata, e)
	}
	c := &call{ctx: ctx, start: time.Now(), obs: obs, digest: sha256.New()}
	obs.RequestDigest = c.digest.Sum(nil)
	return c
}

func (c *call) received(payload []byte) {
	c.obs.RequestCount++
	c.obs.RequestBytes += uint64(len(payload))
	c.digest.Write(binary.BigEndian.AppendUint32(nil, uint32(len(payload))))
	c.digest.Write(payload)
	c.obs.RequestDigest = c.digest.Sum(nil)
}

// snapshot is the observation as it is now, for a response: the record
// made when the handler returns may still change it.
func (c *call) snapshot() *conformancev1.Observation {
	return proto.Clone(c.obs).(*conformancev1.Observation)
}

// record stores the observation under the keys the actions set, once the
// handler returns.
func (s *service) record(c *call, keys ...string) {
	select {
	case <-c.ctx.Done():
		c.obs.Cancelled = true
	default:
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	added := false
	for _, k := range keys {
		if k != "" {
			s.records[k] = c.obs
			added = true
		}
	}
	if added {
		close(s.recorded)
		s.recorded = make(chan struct{})
	}
}

func toMD(entries []*conformancev1.MetadataEntry) metadata.MD {
	md := metadata.MD{}
	for _, e := range entries {
		for _, v := range e.GetValues() {
			md.Append(e.GetKey(), string(v))
		}
	}
	return md
}

// generated is message k's generated payload of n bytes (Action's
// comment): the byte i % 256 at offset i when seed is 0, else the
// concatenated SHA-256 blocks of (seed, k, j).
func generated(seed uint64, k, n uint32) []byte {
	b := make([]byte, n)
	if seed == 0 {
		for i := range b {
			b[i] = byte(i)
		}
		return b
	}
	var in [16]byte
	binary.BigEndian.PutUint64(in[0:], seed)
	binary.BigEndian.PutUint32(in[8:], k)
	for j, off := uint32(0), 0; off < len(b); j, off = j+1, off+sha256.Size {
		binary.BigEndian.PutUint32(in[12:], j)
		sum := sha256.Sum256(in[:])
		copy(b[off:], sum[:])
	}
	return b
}

// responseSizes are the payload sizes of the messages an action sends on a
// stream: one per response_sizes entry, else response_count of
// response_size (0: an echo, marked -1).
func responseSizes(a *conformancev1.Action) []int64 {
	if s := a.GetResponseSizes(); len(s) > 0 {
		out := make([]int64, len(s))
		for i, n := range s {
			out[i] = int64(n)
		}
		return out
	}
	out := make([]int64, a.GetResponseCount())
	for i := range out {
		out[i] = int64(a.GetResponseSize())
		if out[i] == 0 {
			out[i] = -1
		}
	}
	return out
}

// singlePayload is the payload of a Unary or ClientStream response (k 0):
// the first response_sizes entry, else response_size, else the echo.
func singlePayload(a *conformancev1.Action, payload []byte) []byte {
	if s := a.GetResponseSizes(); len(s) > 0 {
		return generated(a.GetSeed(), 0, s[0])
	}
	if n := a.GetResponseSize(); n > 0 {
		return generated(a.GetSeed(), 0, n)
	}
	return payload
}

// before runs the steps of an action that come before its responses:
// headers, sleep, wait_for_cancel.
func before(ctx context.Context, a *conformancev1.Action, setHeader func(metadata.MD) error) error {
	if len(a.GetHeaders()) > 0 {
		if err := setHeader(toMD(a.GetHeaders())); err != nil {
			return err
		}
	}
	if d := a.GetSleep(); d != nil {
		t := time.NewTimer(d.AsDuration())
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return status.FromContextError(ctx.Err()).Err()
		}
	}
	if a.GetWaitForCancel() {
		<-ctx.Done()
		return status.FromContextError(ctx.Err()).Err()
	}
	return nil
}

// after runs the steps that follow the responses: panic, trailers, fail.
func after(a *conformancev1.Action, setTrailer func(metadata.MD)) error {
	if a.GetPanic() {
		panic("conformance: the action asked for a panic")
	}
	if len(a.GetTrailers()) > 0 {
		setTrailer(toMD(a.GetTrailers()))
	}
	if f := a.GetFail(); f != nil && f.GetCode() != int32(codes.OK) {
		return status.FromProto(f).Err()
	}
	return nil
}

func (s *service) Unary(ctx context.Context, req *conformancev1.UnaryRequest) (*conformancev1.UnaryResponse, error) {
	c := newCall(ctx)
	c.received(req.GetPayload())
	a := req.GetAction()
	defer s.record(c, a.GetRecordKey())
	if err := before(ctx, a, func(md metadata.MD) error { return grpc.SetHeader(ctx, md) }); err != nil {
		return nil, err
	}
	resp := &conformancev1.UnaryResponse{Payload: singlePayload(a, req.GetPayload())}
	if a.GetObserve() {
		resp.Observation = c.snapshot()
	}
	if err := after(a, func(md metadata.MD) { _ = grpc.SetTrailer(ctx, md) }); err != nil {
		return nil, err
	}
	return resp, nil
}

// sendAll sends an action's response messages on a stream; index counts
// the messages of the whole stream.
func sendAll(ctx context.Context, c *call, a *conformancev1.Action, payload []byte, index *uint32, send func(payload []byte, index uint32, obs *conformancev1.Observation) error) error {
	for i, size := range responseSizes(a) {
		if i > 0 && a.GetMessageInterval() != nil {
			t := time.NewTimer(a.GetMessageInterval().AsDuration())
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
				return status.FromContextError(ctx.Err()).Err()
			}
		}
		var obs *conformancev1.Observation
		if i == 0 && a.GetObserve() {
			obs = c.snapshot()
		}
		p := payload
		if size >= 0 {
			p = generated(a.GetSeed(), *index, uint32(size))
		}
		if err := send(p, *index, obs); err != nil {
			return err
		}
		*index++
	}
	return nil
}

func (s *service) ServerStream(req *conformancev1.ServerStreamRequest, stream grpc.ServerStreamingServer[conformancev1.ServerStreamResponse]) error {
	ctx := stream.Context()
	c := newCall(ctx)
	c.received(req.GetPayload())
	a := req.GetAction()
	defer s.record(c, a.GetRecordKey())
	if err := before(ctx, a, stream.SetHeader); err != nil {
		return err
	}
	var index uint32
	err := sendAll(ctx, c, a, req.GetPayload(), &index, func(p []byte, i uint32, obs *conformancev1.Observation) error {
		return stream.Send(&conformancev1.ServerStreamResponse{Payload: p, Index: i, Observation: obs})
	})
	if err != nil {
		return err
	}
	return after(a, stream.SetTrailer)
}

func (s *service) ClientStream(stream grpc.ClientStreamingServer[conformancev1.ClientStreamRequest, conformancev1.ClientStreamResponse]) error {
	ctx := stream.Context()
	c := newCall(ctx)
	var first *conformancev1.Action
	var last []byte
	var keys []string
	defer func() { s.record(c, keys...) }()
	for {
		req, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return err
		}
		c.received(req.GetPayload())
		last = req.GetPayload()
		a := req.GetAction()
		if first == nil {
			first = a
			if first == nil {
				first = &conformancev1.Action{}
			}
		}
		keys = append(keys, a.GetRecordKey())
		if err := before(ctx, a, stream.SetHeader); err != nil {
			return err
		}
		if err := after(a, stream.SetTrailer); err != nil {
			return err
		}
	}
	resp := &conformancev1.ClientStreamResponse{
		Payload:       singlePayload(first, last),
		RequestCount:  c.obs.RequestCount,
		RequestBytes:  c.obs.RequestBytes,
		RequestDigest: c.obs.RequestDigest,
	}
	if first.GetObserve() {
		resp.Observation = c.snapshot()
	}
	return stream.SendAndClose(resp)
}

func (s *service) BidiStream(stream grpc.BidiStreamingServer[conformancev1.BidiStreamRequest, conformancev1.BidiStreamResponse]) error {
	ctx := stream.Context()
	c := newCall(ctx)
	var keys []string
	defer func() { s.record(c, keys...) }()
	var index uint32
	for {
		req, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		c.received(req.GetPayload())
		a := req.GetAction()
		keys = append(keys, a.GetRecordKey())
		setHeader := func(md metadata.MD) error {
			if index == 0 {
				return stream.SetHeader(md)
			}
			return nil // headers are gone with the first response
		}
		if err := before(ctx, a, setHeader); err != nil {
			return err
		}
		err = sendAll(ctx, c, a, req.GetPayload(), &index, func(p []byte, i uint32, obs *conformancev1.Observation) error {
			return stream.Send(&conformancev1.BidiStreamResponse{Payload: p, Index: i, Observation: obs})
		})
		if err != nil {
			return err
		}
		if err := after(a, stream.SetTrailer); err != nil {
			return err
		}
	}
}

func (s *service) GetObservation(ctx context.Context, req *conformancev1.GetObservationRequest) (*conformancev1.GetObservationResponse, error) {
	var deadline <-chan time.Time
	if w := req.GetWait(); w != nil {
		t := time.NewTimer(w.AsDuration())
		defer t.Stop()
		deadline = t.C
	}
	for {
		s.mu.Lock()
		obs, ok := s.records[req.GetKey()]
		recorded := s.recorded
		s.mu.Unlock()
		if ok {
			return &conformancev1.GetObservationResponse{Observation: obs}, nil
		}
		if deadline == nil {
			return nil, status.Errorf(codes.NotFound, "no observation recorded under %q", req.GetKey())
		}
		select {
		case <-recorded:
		case <-deadline:
			deadline = nil
		case <-ctx.Done():
			return nil, status.FromContextError(ctx.Err()).Err()
		}
	}
}
