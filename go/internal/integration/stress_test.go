package integration_test

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/guilhem/operator-plugin-framework/go/internal/tunnel"
)

var (
	stressDuration = flag.Duration("stress.duration", 8*time.Second, "how long TestStress sends traffic through the tunnel (half as long directly)")
	stressSeed     = flag.Uint64("stress.seed", 0, "seed of TestStress's traffic (0: random, printed)")
)

// TestStress sends traffic shaped like real use through the tunnel, and the
// same traffic through direct gRPC as the control: all four RPC kinds at
// once, random concurrency up to 200 callers, random message counts, sizes
// drawn around every boundary the engine has, random content. Every byte of
// every request is checked by the handler and every byte of every response
// by the caller. `go run mage.go stress` runs it for longer.
func TestStress(t *testing.T) {
	seed := *stressSeed
	if seed == 0 {
		seed = rand.Uint64()
	}
	t.Logf("seed %d (rerun with -stress.seed=%d)", seed, seed)

	o := startOperator(t)
	o.plugin(t, "stress", stressService{})
	tunnelled := runStress(t, o.call(t, "stress"), seed, *stressDuration)
	direct := runStress(t, directStress(t), seed, *stressDuration/2)
	t.Logf("tunnel: %v", tunnelled)
	t.Logf("direct: %v", direct)
	for name, r := range map[string]*stressResult{"tunnel": tunnelled, "direct": direct} {
		if r.failed.Load() > 0 {
			t.Errorf("%s: %d of %d calls failed; first failures:\n%s", name, r.failed.Load(), r.calls(), r.firstFailures())
		}
		if r.calls() == 0 {
			t.Errorf("%s: no call completed", name)
		}
	}
}

// directStress serves stressService on a plain gRPC server.
func directStress(t *testing.T) testgrpc.TestServiceClient {
	return testgrpc.NewTestServiceClient(directServer(t, stressService{}))
}

// Payload content. Message i of a call's requests holds gen(seed, 2i, n)
// and message j of its responses gen(seed, 2j+1, n); the call's seed
// travels in metadata, so both ends can check every byte. Payloads are
// windows of one random pool at offsets hashed from (seed, index): random,
// different for every message, and cheap to make and compare even under
// the race detector.

const seedKey = "x-stress-seed"

const poolSize = 8 << 20

var pool = sync.OnceValue(func() []byte {
	b := make([]byte, poolSize)
	_, _ = rand.NewChaCha8([32]byte{'o', 'p', 'f'}).Read(b)
	return b
})

// gen returns message index's n bytes, read-only (they are the pool's).
func gen(seed uint64, index int, n int) []byte {
	h := (seed ^ uint64(index)*0x9e3779b97f4a7c15) * 0xbf58476d1ce4e5b9
	h ^= h >> 31
	off := int(h % uint64(poolSize-n+1))
	return pool()[off : off+n : off+n]
}

// check compares a received payload with what message index must hold.
func check(what string, seed uint64, index int, got []byte, wantLen int) error {
	if len(got) != wantLen {
		return fmt.Errorf("%s: %d bytes, want %d", what, len(got), wantLen)
	}
	want := gen(seed, index, wantLen)
	if !bytes.Equal(got, want) {
		for i := range got {
			if got[i] != want[i] {
				return fmt.Errorf("%s (%d bytes): first difference at byte %d", what, wantLen, i)
			}
		}
	}
	return nil
}

// stressService is the plugin side: it checks every request byte and
// answers with generated content of the sizes asked for. Requests say
// their own sizes through their payload length; a mismatch is DATA_LOSS.
type stressService struct {
	testgrpc.UnimplementedTestServiceServer
}

func callSeed(ctx context.Context) (uint64, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	v := md.Get(seedKey)
	if len(v) != 1 {
		return 0, status.Error(codes.InvalidArgument, "no "+seedKey)
	}
	return strconv.ParseUint(v[0], 10, 64)
}

func checkRequest(seed uint64, i int, p *testgrpc.Payload) error {
	body := p.GetBody()
	if err := check(fmt.Sprintf("request %d", i), seed, 2*i, body, len(body)); err != nil {
		return status.Error(codes.DataLoss, err.Error())
	}
	return nil
}

func (stressService) UnaryCall(ctx context.Context, in *testgrpc.SimpleRequest) (*testgrpc.SimpleResponse, error) {
	seed, err := callSeed(ctx)
	if err != nil {
		return nil, err
	}
	if err := checkRequest(seed, 0, in.GetPayload()); err != nil {
		return nil, err
	}
	return &testgrpc.SimpleResponse{Payload: &testgrpc.Payload{Body: gen(seed, 1, int(in.GetResponseSize()))}}, nil
}

func (stressService) StreamingOutputCall(in *testgrpc.StreamingOutputCallRequest, stream testgrpc.TestService_StreamingOutputCallServer) error {
	seed, err := callSeed(stream.Context())
	if err != nil {
		return err
	}
	if err := checkRequest(seed, 0, in.GetPayload()); err != nil {
		return err
	}
	for j, p := range in.GetResponseParameters() {
		if err := stream.Send(&testgrpc.StreamingOutputCallResponse{Payload: &testgrpc.Payload{Body: gen(seed, 2*j+1, int(p.GetSize()))}}); err != nil {
			return err
		}
	}
	return nil
}

func (stressService) StreamingInputCall(stream testgrpc.TestService_StreamingInputCallServer) error {
	seed, err := callSeed(stream.Context())
	if err != nil {
		return err
	}
	total := 0
	for i := 0; ; i++ {
		in, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return stream.SendAndClose(&testgrpc.StreamingInputCallResponse{AggregatedPayloadSize: int32(total)})
		}
		if err != nil {
			return err
		}
		if err := checkRequest(seed, i, in.GetPayload()); err != nil {
			return err
		}
		total += len(in.GetPayload().GetBody())
	}
}

func (stressService) FullDuplexCall(stream testgrpc.TestService_FullDuplexCallServer) error {
	seed, err := callSeed(stream.Context())
	if err != nil {
		return err
	}
	j := 0
	for i := 0; ; i++ {
		in, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if err := checkRequest(seed, i, in.GetPayload()); err != nil {
			return err
		}
		for _, p := range in.GetResponseParameters() {
			if err := stream.Send(&testgrpc.StreamingOutputCallResponse{Payload: &testgrpc.Payload{Body: gen(seed, 2*j+1, int(p.GetSize()))}}); err != nil {
				return err
			}
			j++
		}
	}
}

// Traffic.

// boundaries are the sizes around which the engine changes behaviour: gRPC's
// buffer pooling (1 KiB), the codec's reference threshold (4 KiB), HTTP/2
// frames (16 KiB), the smallest batch limit (64 KiB), the chunk size and
// the window (2 MiB, less the chunk cost), and large messages.
var boundaries = func() []int {
	var out []int
	for _, b := range []int{0, 1 << 10, 4 << 10, 16 << 10, 64 << 10, tunnel.DefaultInitialWindowSize - 64, 2 << 20, 1 << 20, 3 << 20} {
		for _, d := range []int{-1, 0, 1} {
			if n := b + d; n >= 0 && n <= 3<<20 {
				out = append(out, n)
			}
		}
	}
	return out
}()

// largeSize: calls with a message of at least this size take a slot of
// maxLarge, which bounds the memory the test holds; callBudget bounds the
// bytes of one call, so that a round ends soon after its time is up.
const (
	largeSize  = 256 << 10
	maxLarge   = 6
	callBudget = 8 << 20
)

func pickSize(r *rand.Rand) int {
	switch x := r.IntN(100); {
	case x < 50:
		return r.IntN(8 << 10) // small messages, most of real traffic
	case x < 80:
		return boundaries[r.IntN(len(boundaries))]
	case x < 95:
		return 8<<10 + r.IntN(largeSize-8<<10)
	default:
		return r.IntN(3<<20 + 1)
	}
}

type stressResult struct {
	byKind    [4]atomic.Int64
	messages  atomic.Int64
	bytes     atomic.Int64
	failed    atomic.Int64
	mu        sync.Mutex
	failures  []string
	peakConc  int
	durations time.Duration
}

var kindNames = [4]string{"unary", "server-stream", "client-stream", "bidi"}

func (r *stressResult) calls() int64 {
	var n int64
	for i := range r.byKind {
		n += r.byKind[i].Load()
	}
	return n
}

func (r *stressResult) String() string {
	return fmt.Sprintf("%d calls (unary %d, server stream %d, client stream %d, bidi %d), %d messages, %d bytes checked, %d failed, up to %d callers, %v",
		r.calls(), r.byKind[0].Load(), r.byKind[1].Load(), r.byKind[2].Load(), r.byKind[3].Load(),
		r.messages.Load(), r.bytes.Load(), r.failed.Load(), r.peakConc, r.durations.Round(time.Millisecond))
}

func (r *stressResult) fail(kind int, err error) {
	r.failed.Add(1)
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.failures) < 10 {
		r.failures = append(r.failures, kindNames[kind]+": "+err.Error())
	}
}

func (r *stressResult) firstFailures() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var b bytes.Buffer
	for _, f := range r.failures {
		b.WriteString("  " + f + "\n")
	}
	return b.String()
}

// runStress runs rounds of random concurrency until d has passed.
func runStress(t *testing.T, tc testgrpc.TestServiceClient, seed uint64, d time.Duration) *stressResult {
	res := &stressResult{}
	start := time.Now()
	deadline := start.Add(d)
	rounds := rand.New(rand.NewPCG(seed, 0))
	large := make(chan struct{}, maxLarge)
	var callSeq atomic.Uint64
	for round := 0; time.Now().Before(deadline); round++ {
		conc := []int{1, 1, 4, 16, 64, 200}[rounds.IntN(6)]
		res.peakConc = max(res.peakConc, conc)
		roundEnd := time.Now().Add(d / 4)
		if roundEnd.After(deadline) {
			roundEnd = deadline
		}
		var wg sync.WaitGroup
		for w := range conc {
			r := rand.New(rand.NewPCG(seed, uint64(round)<<20|uint64(w)+1))
			wg.Go(func() {
				for time.Now().Before(roundEnd) {
					kind := r.IntN(4)
					c := newStressCall(r, seed^callSeq.Add(1)*0x9e3779b97f4a7c15, kind)
					if c.large && !acquire(large, roundEnd) {
						break
					}
					err := c.run(tc)
					if c.large {
						<-large
					}
					res.byKind[kind].Add(1)
					if err != nil {
						res.fail(kind, err)
						continue
					}
					res.messages.Add(int64(c.messages()))
					res.bytes.Add(int64(c.bytes()))
				}
			})
		}
		wg.Wait()
	}
	res.durations = time.Since(start)
	return res
}

// acquire takes a slot of sem, unless until passes first.
func acquire(sem chan struct{}, until time.Time) bool {
	t := time.NewTimer(time.Until(until))
	defer t.Stop()
	select {
	case sem <- struct{}{}:
		return true
	case <-t.C:
		return false
	}
}

// stressCall is one call's plan: request sizes and, per request, response sizes.
type stressCall struct {
	seed      uint64
	kind      int
	requests  []int
	responses [][]int // per request (unary and server streaming: one entry)
	large     bool
}

func newStressCall(r *rand.Rand, seed uint64, kind int) *stressCall {
	c := &stressCall{seed: seed, kind: kind}
	budget := callBudget
	size := func() int {
		n := pickSize(r)
		if n > budget {
			n = r.IntN(8 << 10)
		}
		budget -= n
		return n
	}
	nreq, nresp := 1, 1
	switch kind {
	case 1:
		nresp = 1 + r.IntN(12)
	case 2:
		nreq = r.IntN(13)
	case 3:
		nreq = r.IntN(13)
	}
	for range nreq {
		c.requests = append(c.requests, size())
		var resp []int
		n := nresp
		if kind == 3 {
			n = r.IntN(4)
		}
		for range n {
			resp = append(resp, size())
		}
		c.responses = append(c.responses, resp)
	}
	for i, n := range c.requests {
		if n >= largeSize {
			c.large = true
		}
		for _, m := range c.responses[i] {
			if m >= largeSize {
				c.large = true
			}
		}
	}
	return c
}

func (c *stressCall) messages() int {
	n := len(c.requests)
	for _, r := range c.responses {
		n += len(r)
	}
	if c.kind == 2 {
		n = len(c.requests) + 1
	}
	return n
}

func (c *stressCall) bytes() int {
	n := 0
	for i, s := range c.requests {
		n += s
		if c.kind != 2 {
			for _, m := range c.responses[i] {
				n += m
			}
		}
	}
	return n
}

func params(sizes []int) []*testgrpc.ResponseParameters {
	out := make([]*testgrpc.ResponseParameters, len(sizes))
	for i, s := range sizes {
		out[i] = &testgrpc.ResponseParameters{Size: int32(s)}
	}
	return out
}

func (c *stressCall) run(tc testgrpc.TestServiceClient) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	ctx = metadata.AppendToOutgoingContext(ctx, seedKey, strconv.FormatUint(c.seed, 10))
	payload := func(i int) *testgrpc.Payload { return &testgrpc.Payload{Body: gen(c.seed, 2*i, c.requests[i])} }
	j := 0 // response index in the whole call
	checkResp := func(p *testgrpc.Payload, size int) error {
		err := check(fmt.Sprintf("response %d", j), c.seed, 2*j+1, p.GetBody(), size)
		j++
		return err
	}
	switch c.kind {
	case 0:
		resp, err := tc.UnaryCall(ctx, &testgrpc.SimpleRequest{Payload: payload(0), ResponseSize: int32(c.responses[0][0])})
		if err != nil {
			return err
		}
		return checkResp(resp.GetPayload(), c.responses[0][0])
	case 1:
		s, err := tc.StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{Payload: payload(0), ResponseParameters: params(c.responses[0])})
		if err != nil {
			return err
		}
		for _, size := range c.responses[0] {
			resp, err := s.Recv()
			if err != nil {
				return fmt.Errorf("response %d of %d: %w", j, len(c.responses[0]), err)
			}
			if err := checkResp(resp.GetPayload(), size); err != nil {
				return err
			}
		}
		if _, err := s.Recv(); !errors.Is(err, io.EOF) {
			return fmt.Errorf("after the last response: %v, want EOF", err)
		}
		return nil
	case 2:
		s, err := tc.StreamingInputCall(ctx)
		if err != nil {
			return err
		}
		total := 0
		for i := range c.requests {
			if err := s.Send(&testgrpc.StreamingInputCallRequest{Payload: payload(i)}); err != nil {
				_, rerr := s.CloseAndRecv()
				return fmt.Errorf("request %d: %v (status %v)", i, err, rerr)
			}
			total += c.requests[i]
		}
		resp, err := s.CloseAndRecv()
		if err != nil {
			return err
		}
		if int(resp.GetAggregatedPayloadSize()) != total {
			return fmt.Errorf("handler received %d bytes, want %d", resp.GetAggregatedPayloadSize(), total)
		}
		return nil
	default:
		s, err := tc.FullDuplexCall(ctx)
		if err != nil {
			return err
		}
		// Ping-pong: each request's responses are read before the next request.
		for i := range c.requests {
			if err := s.Send(&testgrpc.StreamingOutputCallRequest{Payload: payload(i), ResponseParameters: params(c.responses[i])}); err != nil {
				_, rerr := s.Recv()
				return fmt.Errorf("request %d: %v (status %v)", i, err, rerr)
			}
			for _, size := range c.responses[i] {
				resp, err := s.Recv()
				if err != nil {
					return fmt.Errorf("response %d: %w", j, err)
				}
				if err := checkResp(resp.GetPayload(), size); err != nil {
					return err
				}
			}
		}
		if err := s.CloseSend(); err != nil {
			return err
		}
		if _, err := s.Recv(); !errors.Is(err, io.EOF) {
			return fmt.Errorf("after the last response: %v, want EOF", err)
		}
		return nil
	}
}
