package conformance

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	conformancev1 "github.com/guilhem/operator-plugin-framework/go/gen/conformance/v1"
)

// callResult is how a call through the server operator ended.
type callResult struct {
	st        *status.Status
	header    metadata.MD
	trailer   metadata.MD
	responses []proto.Message
	took      time.Duration
	err       error  // the runner could not make the call
	sdk       string // the SDK under test, for HANDLER_CRASH
}

// handlerCrash is the code, in a case's expectation, that a crashed
// handler gives in the SDK's language (spec 10.2): a Python handler's
// uncaught exception is UNKNOWN, as from grpc.aio; a Go or Rust panic is
// INTERNAL.
const handlerCrash = "HANDLER_CRASH"

func crashCode(sdk string) codes.Code {
	if sdk == "python" {
		return codes.Unknown
	}
	return codes.Internal
}

// sdkKey carries the SDK under test in a case's context.
type sdkKey struct{}

// bgCall is a call running in the background.
type bgCall struct {
	spec   *CallStep
	cancel context.CancelFunc
	done   chan struct{}
	res    callResult
	// Calls repeated for a while: err is their verdict.
	repeated bool
	err      error
}

// requests builds a call's request messages.
func (cs *CallStep) requests() ([]proto.Message, error) {
	var typ string
	switch cs.Method {
	case "Unary":
		typ = "UnaryRequest"
	case "ServerStream":
		typ = "ServerStreamRequest"
	case "ClientStream":
		typ = "ClientStreamRequest"
	case "BidiStream":
		typ = "BidiStreamRequest"
	case "GetObservation":
		typ = "GetObservationRequest"
	default:
		typ = "UnaryRequest"
	}
	mt, err := findType(typ)
	if err != nil {
		return nil, err
	}
	data := cs.Requests
	if cs.Method == "ClientStream" || cs.Method == "BidiStream" {
		if cs.Request != nil {
			return nil, errors.New("streaming calls take requests, not request")
		}
	} else {
		if cs.Requests != nil {
			return nil, errors.New("this call takes one request, not requests")
		}
		data = []map[string]any{cs.Request}
	}
	out := make([]proto.Message, len(data))
	for i, d := range data {
		var v any
		if d != nil {
			v = d
		}
		m, err := buildMessage(mt, v, plainSizes)
		if err != nil {
			return nil, fmt.Errorf("request %d: %w", i, err)
		}
		out[i] = m
	}
	return out, nil
}

func (cs *CallStep) outgoing() (metadata.MD, error) {
	md := metadata.MD{}
	for k, vs := range cs.Metadata {
		for _, v := range vs {
			if strings.HasSuffix(k, "-bin") {
				b, err := base64.StdEncoding.DecodeString(v)
				if err != nil {
					return nil, fmt.Errorf("metadata %s: -bin values are base64: %w", k, err)
				}
				v = string(b)
			}
			md.Append(k, v)
		}
	}
	return md, nil
}

// doCall makes one call on conn. hold, when set, is closed to let a held
// call go on reading (it is cancelled by then).
func doCall(ctx context.Context, conn grpc.ClientConnInterface, cs *CallStep, hold <-chan struct{}) (out callResult) {
	sdk, _ := ctx.Value(sdkKey{}).(string)
	defer func() { out.sdk = sdk }()
	reqs, err := cs.requests()
	if err != nil {
		return callResult{err: err}
	}
	md, err := cs.outgoing()
	if err != nil {
		return callResult{err: err}
	}
	// The case's timeout cancels the call but is not its deadline.
	parent := ctx
	ctx, stop := context.WithCancel(context.WithoutCancel(parent))
	defer stop()
	unhook := context.AfterFunc(parent, stop)
	defer unhook()
	ctx = metadata.NewOutgoingContext(ctx, md)
	var cancel context.CancelFunc
	if cs.Timeout > 0 {
		ctx, cancel = context.WithTimeout(ctx, time.Duration(cs.Timeout))
	} else {
		ctx, cancel = context.WithCancel(ctx)
	}
	defer cancel()
	if cs.CancelAfter > 0 {
		t := time.AfterFunc(time.Duration(cs.CancelAfter), cancel)
		defer t.Stop()
	}
	waitHold := func() {
		if hold != nil {
			<-hold
		}
	}

	start := time.Now()
	var res callResult
	client := conformancev1.NewConformanceServiceClient(conn)
	opts := []grpc.CallOption{grpc.Header(&res.header), grpc.Trailer(&res.trailer)}
	var callErr error
	switch cs.Method {
	case "Unary":
		var resp *conformancev1.UnaryResponse
		resp, callErr = client.Unary(ctx, reqs[0].(*conformancev1.UnaryRequest), opts...)
		if resp != nil {
			res.responses = append(res.responses, resp)
		}
	case "GetObservation":
		var resp *conformancev1.GetObservationResponse
		resp, callErr = client.GetObservation(ctx, reqs[0].(*conformancev1.GetObservationRequest), opts...)
		if resp != nil {
			res.responses = append(res.responses, resp)
		}
	case "ServerStream":
		var stream grpc.ServerStreamingClient[conformancev1.ServerStreamResponse]
		stream, callErr = serverStream(ctx, conn, reqs[0])
		if callErr == nil {
			waitHold()
			for {
				resp, err := stream.Recv()
				if err != nil {
					callErr = err
					break
				}
				res.responses = append(res.responses, resp)
			}
			res.header, _ = stream.Header()
			res.trailer = stream.Trailer()
		}
	case "ClientStream":
		var stream grpc.ClientStreamingClient[conformancev1.ClientStreamRequest, conformancev1.ClientStreamResponse]
		stream, callErr = client.ClientStream(ctx)
		if callErr == nil {
			for _, r := range reqs {
				if err := stream.Send(r.(*conformancev1.ClientStreamRequest)); err != nil {
					break // io.EOF: the call ended; CloseAndRecv says how
				}
			}
			waitHold()
			var resp *conformancev1.ClientStreamResponse
			resp, callErr = stream.CloseAndRecv()
			if resp != nil {
				res.responses = append(res.responses, resp)
			}
			res.header, _ = stream.Header()
			res.trailer = stream.Trailer()
		}
	case "BidiStream":
		var stream grpc.BidiStreamingClient[conformancev1.BidiStreamRequest, conformancev1.BidiStreamResponse]
		stream, callErr = client.BidiStream(ctx)
		if callErr == nil {
			callErr = bidi(stream, reqs, &res, hold)
			res.header, _ = stream.Header()
			res.trailer = stream.Trailer()
		}
	default:
		resp := &conformancev1.UnaryResponse{}
		callErr = conn.Invoke(ctx, cs.Method, reqs[0], resp, opts...)
		if callErr == nil {
			res.responses = append(res.responses, resp)
		}
	}
	res.took = time.Since(start)
	if errors.Is(callErr, io.EOF) {
		callErr = nil
	}
	res.st = status.Convert(callErr)
	return res
}

// serverStream opens a ServerStream call. Unlike the generated client, it
// ignores the io.EOF of a request sent after the call ended (as gRPC's
// SendMsg reports it), so that Recv gives the call's real status.
func serverStream(ctx context.Context, conn grpc.ClientConnInterface, req proto.Message) (grpc.ServerStreamingClient[conformancev1.ServerStreamResponse], error) {
	desc := &conformancev1.ConformanceService_ServiceDesc.Streams[0]
	cs, err := conn.NewStream(ctx, desc, conformancev1.ConformanceService_ServerStream_FullMethodName)
	if err != nil {
		return nil, err
	}
	if err := cs.SendMsg(req); err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	if err := cs.CloseSend(); err != nil {
		return nil, err
	}
	return &grpc.GenericClientStream[conformancev1.ServerStreamRequest, conformancev1.ServerStreamResponse]{ClientStream: cs}, nil
}

// bidi sends each request and reads the responses its action asks for
// before the next; then half-closes and reads to the end.
func bidi(stream grpc.BidiStreamingClient[conformancev1.BidiStreamRequest, conformancev1.BidiStreamResponse], reqs []proto.Message, res *callResult, hold <-chan struct{}) error {
	for _, r := range reqs {
		req := r.(*conformancev1.BidiStreamRequest)
		if err := stream.Send(req); err != nil {
			break
		}
		if hold != nil {
			continue
		}
		for range responsesOf(req.GetAction()) {
			resp, err := stream.Recv()
			if err != nil {
				return err
			}
			res.responses = append(res.responses, resp)
		}
	}
	if hold != nil {
		<-hold
	}
	_ = stream.CloseSend()
	for {
		resp, err := stream.Recv()
		if err != nil {
			return err
		}
		res.responses = append(res.responses, resp)
	}
}

// responsesOf is how many responses an action asks a stream to send.
func responsesOf(a *conformancev1.Action) int {
	if n := len(a.GetResponseSizes()); n > 0 {
		return n
	}
	return int(a.GetResponseCount())
}

// check compares a call's result with what the case expects.
func (e *Expectation) check(res callResult) error {
	if res.err != nil {
		return res.err
	}
	want, _ := codeByName(e.Code)
	if e.Code == handlerCrash {
		want = crashCode(res.sdk)
	}
	if got := res.st.Code(); got != want {
		return fmt.Errorf("status %s (%q), want %s", codeName(got), res.st.Message(), codeName(want))
	}
	if e.Message != nil && res.st.Message() != *e.Message {
		return fmt.Errorf("status message %q, want %q", res.st.Message(), *e.Message)
	}
	if e.MessageContains != "" && !strings.Contains(res.st.Message(), e.MessageContains) {
		return fmt.Errorf("status message %q, want it to contain %q", res.st.Message(), e.MessageContains)
	}
	if e.Details != nil {
		var got []any
		for _, d := range res.st.Proto().GetDetails() {
			got = append(got, anyJSON(d))
		}
		if err := match("details", e.Details, got); err != nil {
			return err
		}
	}
	if err := checkMetadata("header", e.Headers, res.header); err != nil {
		return err
	}
	if err := checkMetadata("trailer", e.Trailers, res.trailer); err != nil {
		return err
	}
	if e.ResponseCount != nil && len(res.responses) != *e.ResponseCount {
		return fmt.Errorf("%d responses, want %d", len(res.responses), *e.ResponseCount)
	}
	if e.Responses != nil {
		if len(res.responses) != len(e.Responses) {
			return fmt.Errorf("%d responses, want %d", len(res.responses), len(e.Responses))
		}
		for i, w := range e.Responses {
			if err := match(fmt.Sprintf("responses[%d]", i), w, matchable(res.responses[i].ProtoReflect())); err != nil {
				return err
			}
		}
	}
	if e.Response != nil {
		if len(res.responses) == 0 {
			return errors.New("no response, want one")
		}
		last := res.responses[len(res.responses)-1]
		if err := match("response", e.Response, matchable(last.ProtoReflect())); err != nil {
			return err
		}
	}
	if e.MaxDuration > 0 && res.took > time.Duration(e.MaxDuration) {
		return fmt.Errorf("the call took %v, want at most %v", res.took.Round(time.Millisecond), time.Duration(e.MaxDuration))
	}
	if e.MinDuration > 0 && res.took < time.Duration(e.MinDuration) {
		return fmt.Errorf("the call took %v, want at least %v", res.took.Round(time.Millisecond), time.Duration(e.MinDuration))
	}
	return nil
}

func checkMetadata(what string, want map[string][]string, got metadata.MD) error {
	for _, k := range sortedKeys(want) {
		var gv []string
		for _, v := range got.Get(k) {
			gv = append(gv, metadataValue(k, []byte(v)))
		}
		if !slices.Equal(gv, want[k]) {
			if len(want[k]) == 0 {
				return fmt.Errorf("%s %s = %q, want it absent", what, k, gv)
			}
			return fmt.Errorf("%s %s = %q, want %q (all %ss: %v)", what, k, gv, want[k], what, got)
		}
	}
	return nil
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// processIDs returns the distinct observation.process_id values of the
// responses.
func processIDs(responses []proto.Message) map[uint64]bool {
	ids := map[uint64]bool{}
	for _, r := range responses {
		m := r.ProtoReflect()
		fd := m.Descriptor().Fields().ByName("observation")
		if fd == nil || !m.Has(fd) {
			continue
		}
		obs := m.Get(fd).Message()
		ids[obs.Get(obs.Descriptor().Fields().ByName(protoreflect.Name("process_id"))).Uint()] = true
	}
	return ids
}

// parallel makes n identical calls at once and checks each.
func parallel(ctx context.Context, conn grpc.ClientConnInterface, cs *CallStep) error {
	n := cs.Parallel
	results := make([]callResult, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { results[i] = doCall(ctx, conn, cs, nil) })
	}
	wg.Wait()
	var errs []string
	var all []proto.Message
	failed := 0
	for i, r := range results {
		all = append(all, r.responses...)
		if err := cs.Expect.check(r); err != nil {
			failed++
			if len(errs) < 3 {
				errs = append(errs, fmt.Sprintf("call %d: %v", i, err))
			}
		}
	}
	if failed > 0 {
		return fmt.Errorf("%d of %d parallel calls failed: %s", failed, n, strings.Join(errs, "; "))
	}
	if want := cs.Expect.DistinctProcesses; want > 0 {
		if got := len(processIDs(all)); got < want {
			return fmt.Errorf("answers came from %d plugin processes, want at least %d", got, want)
		}
	}
	return nil
}

// repeatCalls makes the call again and again for cs.RepeatFor, Parallel at
// a time, and checks every one; it stops early when ctx ends.
func repeatCalls(ctx context.Context, conn grpc.ClientConnInterface, cs *CallStep) error {
	end := time.Now().Add(time.Duration(cs.RepeatFor))
	var mu sync.Mutex
	var errs []string
	made, failed := 0, 0
	var wg sync.WaitGroup
	for range max(cs.Parallel, 1) {
		wg.Go(func() {
			for time.Now().Before(end) && ctx.Err() == nil {
				err := cs.Expect.check(doCall(ctx, conn, cs, nil))
				mu.Lock()
				made++
				if err != nil && ctx.Err() == nil {
					failed++
					if len(errs) < 3 {
						errs = append(errs, fmt.Sprintf("call %d: %v", made, err))
					}
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if failed > 0 {
		return fmt.Errorf("%d of %d calls failed: %s", failed, made, strings.Join(errs, "; "))
	}
	if made == 0 {
		return errors.New("no call made")
	}
	return nil
}
