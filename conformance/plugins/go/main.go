// Command go is the Go SDK's plugin under test: it serves
// conformance.v1.ConformanceService through the framework's Go client, with
// the settings the conformance runner hands it in OPF_CONFORMANCE_*
// environment variables (docs/conformance.md), and drains on SIGTERM.
package main

import (
	"context"
	"errors"
	"fmt"
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
	ctx   context.Context
	start time.Time
	obs   *conformancev1.Observation
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
	return &call{ctx: ctx, start: time.Now(), obs: obs}
}

func (c *call) received(payload []byte) {
	c.obs.RequestCount++
	c.obs.RequestBytes += uint64(len(payload))
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

func pattern(n uint32) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i)
	}
	return b
}

func responsePayload(a *conformancev1.Action, payload []byte) []byte {
	if a.GetResponseSize() > 0 {
		return pattern(a.GetResponseSize())
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
	resp := &conformancev1.UnaryResponse{Payload: responsePayload(a, req.GetPayload())}
	if a.GetObserve() {
		resp.Observation = c.obs
	}
	if err := after(a, func(md metadata.MD) { _ = grpc.SetTrailer(ctx, md) }); err != nil {
		return nil, err
	}
	return resp, nil
}

// sendAll sends an action's response messages on a stream; index counts
// the messages of the whole stream.
func sendAll(ctx context.Context, c *call, a *conformancev1.Action, payload []byte, index *uint32, send func(payload []byte, index uint32, obs *conformancev1.Observation) error) error {
	for i := range a.GetResponseCount() {
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
			obs = c.obs
		}
		if err := send(responsePayload(a, payload), *index, obs); err != nil {
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
		Payload:      responsePayload(first, last),
		RequestCount: c.obs.RequestCount,
		RequestBytes: c.obs.RequestBytes,
	}
	if first.GetObserve() {
		resp.Observation = c.obs
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
