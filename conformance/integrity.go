package conformance

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	conformancev1 "github.com/guilhem/operator-plugin-framework/go/gen/conformance/v1"
)

// The integrity step: many calls of every RPC kind whose messages each have
// their own random size and content, every byte checked. Requests carry
// random bytes; the plugin echoes them (checked against what was sent),
// generates responses from a seed (regenerated here and compared), or
// digests them (compared with the runner's own digest). Sizes are encoded
// message lengths, so that the boundaries the cases list (chunk, window,
// batch) are hit by the messages the tunnel carries, not by their payloads.

// IntegrityStep makes the calls; docs/conformance.md describes it.
type IntegrityStep struct {
	// Kinds are the methods called: Unary, ServerStream, ClientStream,
	// BidiStream (default all four, interleaved).
	Kinds []string `yaml:"kinds"`
	// Sizes are encoded message lengths. In each kind, every size is used
	// by at least one request and one response (the nearest length a
	// message can have when it cannot have this one exactly).
	Sizes []Size `yaml:"sizes"`
	// RandomMax bounds the random sizes of the other messages (default
	// 64 KiB); they are drawn log-uniformly from 0 to it.
	RandomMax Size `yaml:"random_max"`
	// Messages bounds the requests of a client or bidi stream and the
	// responses of a server or bidi stream; each call draws its count from
	// 1 to this (default 4).
	Messages int `yaml:"messages"`
	// Calls is the least number of calls per kind (default: as many as
	// the sizes need).
	Calls int `yaml:"calls"`
	// Parallel is how many calls are in flight at once (default 1).
	Parallel int `yaml:"parallel"`
	// Timeout is each call's deadline (default 30 s).
	Timeout Duration `yaml:"timeout"`
}

var integrityKinds = []string{"Unary", "ServerStream", "ClientStream", "BidiStream"}

func (is *IntegrityStep) validate() error {
	for _, k := range is.Kinds {
		if !slices.Contains(integrityKinds, k) {
			return fmt.Errorf("integrity kind %q: want one of %v", k, integrityKinds)
		}
	}
	if is.Messages < 0 || is.Calls < 0 || is.Parallel < 0 {
		return errors.New("integrity: messages, calls and parallel are not negative")
	}
	return nil
}

// genPayload is message k's generated payload of n bytes, as
// conformance.proto defines it: the byte i % 256 at offset i when seed is 0,
// else the concatenation of SHA-256(seed BE64 || k BE32 || j BE32), j = 0,
// 1, ... The runner's own copy, so that a plugin's mistake is not shared.
func genPayload(seed uint64, k uint32, n int) []byte {
	out := make([]byte, n)
	if seed == 0 {
		for i := range out {
			out[i] = byte(i)
		}
		return out
	}
	var in [16]byte
	binary.BigEndian.PutUint64(in[:8], seed)
	binary.BigEndian.PutUint32(in[8:12], k)
	for j := 0; j*sha256.Size < n; j++ {
		binary.BigEndian.PutUint32(in[12:], uint32(j))
		sum := sha256.Sum256(in[:])
		copy(out[j*sha256.Size:], sum[:])
	}
	return out
}

// requestDigest is Observation.request_digest of these payloads: SHA-256
// over each one's length (4 bytes big-endian) and bytes.
func requestDigest(payloads [][]byte) []byte {
	h := sha256.New()
	for _, p := range payloads {
		h.Write(binary.BigEndian.AppendUint32(nil, uint32(len(p))))
		h.Write(p)
	}
	return h.Sum(nil)
}

// fitPayload is the payload length that makes a message encode to exactly
// want bytes, base being its length without a payload (field 1, bytes).
// When no length does (want just above base, or just past a varint
// boundary), it is the longest payload that stays below want.
func fitPayload(base, want int) int {
	room := want - base
	best := 0
	for p := max(room-6, 1); p <= room-2; p++ {
		if n := 1 + protowire.SizeVarint(uint64(p)) + p; n <= room {
			best = p
		}
	}
	return best
}

// caseSeed derives a case's random seed from the run's seed and its name.
func caseSeed(run uint64, name string) uint64 {
	h := fnv.New64a()
	h.Write([]byte(name))
	return run ^ h.Sum64()
}

// icall is one call the integrity step makes: its requests and the
// responses it must get, each described so that the bytes can be
// regenerated.
type icall struct {
	n    int // position among all calls, for the report
	kind string
	// Requests, with their payloads.
	reqs     []proto.Message
	payloads [][]byte
	// Responses expected, in order.
	want []iresp
}

// iresp is a response the plugin must send.
type iresp struct {
	echo    int    // >= 0: the payload echoes request echo's payload
	seed    uint64 // else generated from seed, index and size
	index   uint32
	size    int
	observe bool // carries an Observation whose digest covers requests 0..upTo
	upTo    int
	// ClientStream: the counts and digest of every request.
	counts bool
}

// sizeQueue hands out the step's sizes in a random order, then random
// sizes.
type sizeQueue struct {
	rng   *rand.Rand
	queue []int
	max   int
}

func newSizeQueue(rng *rand.Rand, sizes []Size, maxRandom int) *sizeQueue {
	q := &sizeQueue{rng: rng, max: maxRandom}
	for _, s := range sizes {
		q.queue = append(q.queue, int(s))
	}
	rng.Shuffle(len(q.queue), func(i, j int) { q.queue[i], q.queue[j] = q.queue[j], q.queue[i] })
	return q
}

func (q *sizeQueue) next() int {
	if len(q.queue) > 0 {
		n := q.queue[0]
		q.queue = q.queue[1:]
		return n
	}
	// Log-uniform, so that small and large messages are both common.
	if q.max <= 0 || q.rng.IntN(8) == 0 {
		return q.rng.IntN(3)
	}
	bits := q.rng.IntN(bitsLen(q.max)) + 1
	return min(q.rng.IntN(1<<bits), q.max)
}

func (q *sizeQueue) empty() bool { return len(q.queue) == 0 }

func bitsLen(n int) int {
	b := 0
	for ; n > 0; n >>= 1 {
		b++
	}
	return b
}

// randomBytes is n random bytes.
func randomBytes(rng *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := 0; i < n; i += 8 {
		v := rng.Uint64()
		for j := 0; j < 8 && i+j < n; j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	return b
}

// planner builds the calls of one kind.
type planner struct {
	rng      *rand.Rand
	req      *sizeQueue
	resp     *sizeQueue
	messages int
}

func (p *planner) count() int { return 1 + p.rng.IntN(p.messages) }

func (p *planner) seed() uint64 {
	for {
		if s := p.rng.Uint64(); s != 0 {
			return s
		}
	}
}

// payloadFor fills m's payload (field 1) so that m encodes to want bytes.
func (p *planner) payloadFor(m proto.Message, want int) []byte {
	b := randomBytes(p.rng, fitPayload(proto.Size(m), want))
	setPayload(m, b)
	return b
}

func setPayload(m proto.Message, b []byte) {
	switch m := m.(type) {
	case *conformancev1.UnaryRequest:
		m.Payload = b
	case *conformancev1.ServerStreamRequest:
		m.Payload = b
	case *conformancev1.ClientStreamRequest:
		m.Payload = b
	case *conformancev1.BidiStreamRequest:
		m.Payload = b
	}
}

// respSize is the payload size of a response that must encode to want
// bytes besides base bytes of other fields.
func respSize(base, want int) int { return fitPayload(base, want) }

func indexSize(k uint32) int {
	if k == 0 {
		return 0
	}
	return 1 + protowire.SizeVarint(uint64(k))
}

func (p *planner) unary() *icall {
	c := &icall{kind: "Unary"}
	req := &conformancev1.UnaryRequest{}
	switch p.rng.IntN(3) {
	case 0: // echo
		pl := p.payloadFor(req, p.req.next())
		c.want = []iresp{{echo: 0}}
		c.reqs, c.payloads = []proto.Message{req}, [][]byte{pl}
		return c
	case 1: // generated
		seed := p.seed()
		size := respSize(0, p.resp.next())
		req.Action = &conformancev1.Action{Seed: seed, ResponseSizes: []uint32{uint32(size)}}
		c.want = []iresp{{echo: -1, seed: seed, size: size}}
	default: // generated, with the observation: its digest checks the request
		seed := p.seed()
		size := p.rng.IntN(4096)
		req.Action = &conformancev1.Action{Seed: seed, ResponseSizes: []uint32{uint32(size)}, Observe: true}
		c.want = []iresp{{echo: -1, seed: seed, size: size, observe: true}}
	}
	pl := p.payloadFor(req, p.req.next())
	c.reqs, c.payloads = []proto.Message{req}, [][]byte{pl}
	return c
}

func (p *planner) serverStream() *icall {
	c := &icall{kind: "ServerStream"}
	req := &conformancev1.ServerStreamRequest{}
	n := p.count()
	switch p.rng.IntN(3) {
	case 0: // every response echoes the request
		req.Action = &conformancev1.Action{ResponseCount: uint32(n)}
		for k := range n {
			c.want = append(c.want, iresp{echo: 0, index: uint32(k)})
		}
	default:
		seed := p.seed()
		observe := p.rng.IntN(2) == 0
		a := &conformancev1.Action{Seed: seed, Observe: observe}
		for k := range n {
			size := respSize(indexSize(uint32(k)), p.resp.next())
			if k == 0 && observe {
				size = p.rng.IntN(4096) // the observation makes its length inexact
			}
			a.ResponseSizes = append(a.ResponseSizes, uint32(size))
			c.want = append(c.want, iresp{echo: -1, seed: seed, index: uint32(k), size: size, observe: k == 0 && observe})
		}
		req.Action = a
	}
	pl := p.payloadFor(req, p.req.next())
	c.reqs, c.payloads = []proto.Message{req}, [][]byte{pl}
	return c
}

func (p *planner) clientStream() *icall {
	c := &icall{kind: "ClientStream"}
	n := p.count()
	targets := make([]int, n)
	for i := range targets {
		targets[i] = p.req.next()
	}
	first := &conformancev1.ClientStreamRequest{}
	generated := p.rng.IntN(2) == 0
	observe := p.rng.IntN(3) == 0
	var seed uint64
	if generated || observe {
		first.Action = &conformancev1.Action{Observe: observe}
	}
	c.reqs, c.payloads = make([]proto.Message, n), make([][]byte, n)
	for i := range n {
		c.reqs[i] = &conformancev1.ClientStreamRequest{}
	}
	c.reqs[0] = first
	fill := func(i int) { c.payloads[i] = p.payloadFor(c.reqs[i], targets[i]) }
	for i := range n {
		fill(i)
	}
	w := iresp{echo: n - 1, counts: true, observe: observe, upTo: n - 1}
	if generated {
		seed = p.seed()
		first.Action.Seed = seed
		respTarget := p.resp.next()
		size := p.rng.IntN(4096) // the observation makes the length inexact
		// The response holds the payload, the counts and the digest; its
		// size sits in the first request, whose length depends on it: fit
		// both twice.
		for range 2 {
			total := 0
			for _, pl := range c.payloads {
				total += len(pl)
			}
			if !observe {
				resp := &conformancev1.ClientStreamResponse{RequestCount: uint32(n), RequestBytes: uint64(total), RequestDigest: make([]byte, sha256.Size)}
				size = respSize(proto.Size(resp), respTarget)
			}
			first.Action.ResponseSizes = []uint32{uint32(size)}
			setPayload(first, nil)
			fill(0)
		}
		w = iresp{echo: -1, seed: seed, size: size, counts: true, observe: observe, upTo: n - 1}
	}
	c.want = []iresp{w}
	return c
}

func (p *planner) bidi() *icall {
	c := &icall{kind: "BidiStream"}
	n := p.count()
	k := uint32(0)
	observed := false
	for i := range n {
		req := &conformancev1.BidiStreamRequest{}
		r := p.count()
		observe := !observed && (i == n-1 || p.rng.IntN(n) == 0)
		var want []iresp
		switch v := p.rng.IntN(4); {
		case v == 0 && !observe && i < n-1: // no response: the next request comes first
		case v == 1: // echoes
			req.Action = &conformancev1.Action{ResponseCount: uint32(r), Observe: observe}
			for j := range r {
				want = append(want, iresp{echo: i, index: k + uint32(j), observe: observe && j == 0, upTo: i})
			}
		default:
			seed := p.seed()
			a := &conformancev1.Action{Seed: seed, Observe: observe}
			for j := range r {
				idx := k + uint32(j)
				size := respSize(indexSize(idx), p.resp.next())
				if j == 0 && observe {
					size = p.rng.IntN(4096)
				}
				a.ResponseSizes = append(a.ResponseSizes, uint32(size))
				want = append(want, iresp{echo: -1, seed: seed, index: idx, size: size, observe: observe && j == 0, upTo: i})
			}
			req.Action = a
		}
		if len(want) > 0 {
			observed = observed || observe
		}
		k += uint32(len(want))
		pl := p.payloadFor(req, p.req.next())
		c.reqs = append(c.reqs, req)
		c.payloads = append(c.payloads, pl)
		c.want = append(c.want, want...)
	}
	return c
}

// plan builds the calls of the step, kinds interleaved so that parallel
// calls mix them.
func (is *IntegrityStep) plan(seed uint64) []*icall {
	kinds := is.Kinds
	if len(kinds) == 0 {
		kinds = integrityKinds
	}
	messages := is.Messages
	if messages == 0 {
		messages = 4
	}
	maxRandom := int(is.RandomMax)
	if maxRandom == 0 {
		maxRandom = 64 << 10
	}
	perKind := make([][]*icall, len(kinds))
	for i, kind := range kinds {
		rng := rand.New(rand.NewPCG(seed, uint64(i)))
		p := &planner{rng: rng, req: newSizeQueue(rng, is.Sizes, maxRandom), resp: newSizeQueue(rng, is.Sizes, maxRandom), messages: messages}
		for n := 0; n < max(is.Calls, 1) || !p.req.empty() || !p.resp.empty(); n++ {
			var c *icall
			switch kind {
			case "Unary":
				c = p.unary()
			case "ServerStream":
				c = p.serverStream()
			case "ClientStream":
				c = p.clientStream()
			default:
				c = p.bidi()
			}
			perKind[i] = append(perKind[i], c)
		}
	}
	var all []*icall
	for round := 0; ; round++ {
		added := false
		for _, calls := range perKind {
			if round < len(calls) {
				calls[round].n = len(all)
				all = append(all, calls[round])
				added = true
			}
		}
		if !added {
			return all
		}
	}
}

// run makes the step's calls on conn and checks every byte.
// seed makes the calls; replay names how to make the same ones again.
func (is *IntegrityStep) run(ctx context.Context, conn grpc.ClientConnInterface, seed uint64, replay string, logf func(string, ...any)) error {
	calls := is.plan(seed)
	parallel := max(is.Parallel, 1)
	timeout := is.Timeout.D(30 * time.Second)
	start := time.Now()
	var bytesMoved atomic.Int64
	var mu sync.Mutex
	var failures []string
	failed := 0
	jobs := make(chan *icall)
	var wg sync.WaitGroup
	for range parallel {
		wg.Go(func() {
			for c := range jobs {
				cctx, cancel := context.WithTimeout(ctx, timeout)
				moved, err := c.do(cctx, conn)
				cancel()
				bytesMoved.Add(moved)
				if err != nil {
					mu.Lock()
					failed++
					if len(failures) < 4 {
						failures = append(failures, fmt.Sprintf("call %d (%s, %s): %v", c.n, c.kind, c.describe(), err))
					}
					mu.Unlock()
					logf("integrity: call %d (%s) failed: %v", c.n, c.kind, err)
				}
			}
		})
	}
	for _, c := range calls {
		select {
		case jobs <- c:
		case <-ctx.Done():
		}
	}
	close(jobs)
	wg.Wait()
	logf("integrity: %d calls, %d parallel, %.1f MiB of payload, %v", len(calls), parallel, float64(bytesMoved.Load())/(1<<20), time.Since(start).Round(time.Millisecond))
	if failed > 0 {
		return fmt.Errorf("%d of %d calls failed (%s): %s", failed, len(calls), replay, strings.Join(failures, "; "))
	}
	return ctx.Err()
}

// describe summarises a call's message lengths.
func (c *icall) describe() string {
	var reqs []string
	for _, r := range c.reqs {
		reqs = append(reqs, fmt.Sprint(proto.Size(r)))
	}
	return fmt.Sprintf("requests of %s bytes, %d responses", strings.Join(reqs, ", "), len(c.want))
}

// do makes the call and checks its responses; it returns the payload bytes
// moved.
func (c *icall) do(ctx context.Context, conn grpc.ClientConnInterface) (int64, error) {
	var moved int64
	for _, p := range c.payloads {
		moved += int64(len(p))
	}
	client := conformancev1.NewConformanceServiceClient(conn)
	var got []proto.Message
	var err error
	switch c.kind {
	case "Unary":
		var resp *conformancev1.UnaryResponse
		resp, err = client.Unary(ctx, c.reqs[0].(*conformancev1.UnaryRequest))
		if err == nil {
			got = append(got, resp)
		}
	case "ServerStream":
		var stream grpc.ServerStreamingClient[conformancev1.ServerStreamResponse]
		if stream, err = serverStream(ctx, conn, c.reqs[0]); err == nil {
			for {
				resp, rerr := stream.Recv()
				if rerr != nil {
					if !errors.Is(rerr, io.EOF) {
						err = rerr
					}
					break
				}
				got = append(got, resp)
			}
		}
	case "ClientStream":
		var stream grpc.ClientStreamingClient[conformancev1.ClientStreamRequest, conformancev1.ClientStreamResponse]
		if stream, err = client.ClientStream(ctx); err == nil {
			for _, r := range c.reqs {
				if stream.Send(r.(*conformancev1.ClientStreamRequest)) != nil {
					break // CloseAndRecv says why
				}
			}
			var resp *conformancev1.ClientStreamResponse
			if resp, err = stream.CloseAndRecv(); err == nil {
				got = append(got, resp)
			}
		}
	default:
		var stream grpc.BidiStreamingClient[conformancev1.BidiStreamRequest, conformancev1.BidiStreamResponse]
		if stream, err = client.BidiStream(ctx); err == nil {
			// Both directions at once: requests go out while responses
			// come in.
			sendDone := make(chan error, 1)
			go func() {
				for _, r := range c.reqs {
					if err := stream.Send(r.(*conformancev1.BidiStreamRequest)); err != nil {
						sendDone <- nil // Recv says why
						return
					}
				}
				sendDone <- stream.CloseSend()
			}()
			for {
				resp, rerr := stream.Recv()
				if rerr != nil {
					if !errors.Is(rerr, io.EOF) {
						err = rerr
					}
					break
				}
				got = append(got, resp)
			}
			if serr := <-sendDone; err == nil && serr != nil {
				err = serr
			}
		}
	}
	for _, g := range got {
		moved += int64(len(payloadOf(g)))
	}
	if err != nil {
		return moved, fmt.Errorf("the call failed after %d of %d responses: %w", len(got), len(c.want), err)
	}
	return moved, c.check(got)
}

func payloadOf(m proto.Message) []byte {
	switch m := m.(type) {
	case *conformancev1.UnaryResponse:
		return m.GetPayload()
	case *conformancev1.ServerStreamResponse:
		return m.GetPayload()
	case *conformancev1.ClientStreamResponse:
		return m.GetPayload()
	case *conformancev1.BidiStreamResponse:
		return m.GetPayload()
	}
	return nil
}

// check compares every response with what it must be.
func (c *icall) check(got []proto.Message) error {
	if len(got) != len(c.want) {
		return fmt.Errorf("%d responses, want %d", len(got), len(c.want))
	}
	for i, w := range c.want {
		g := got[i]
		var want []byte
		if w.echo >= 0 {
			want = c.payloads[w.echo]
		} else {
			want = genPayload(w.seed, w.index, w.size)
		}
		what := fmt.Sprintf("response %d", i)
		if w.echo >= 0 {
			what += fmt.Sprintf(" (echo of request %d)", w.echo)
		} else {
			what += fmt.Sprintf(" (generated: seed %d, index %d)", w.seed, w.index)
		}
		if err := sameBytes(payloadOf(g), want); err != nil {
			return fmt.Errorf("%s: payload %v", what, err)
		}
		var obs *conformancev1.Observation
		switch g := g.(type) {
		case *conformancev1.UnaryResponse:
			obs = g.GetObservation()
		case *conformancev1.ServerStreamResponse:
			obs = g.GetObservation()
			if g.GetIndex() != w.index {
				return fmt.Errorf("%s: index %d, want %d", what, g.GetIndex(), w.index)
			}
		case *conformancev1.BidiStreamResponse:
			obs = g.GetObservation()
			if g.GetIndex() != w.index {
				return fmt.Errorf("%s: index %d, want %d", what, g.GetIndex(), w.index)
			}
		case *conformancev1.ClientStreamResponse:
			obs = g.GetObservation()
			total := 0
			for _, p := range c.payloads {
				total += len(p)
			}
			if g.GetRequestCount() != uint32(len(c.payloads)) || g.GetRequestBytes() != uint64(total) {
				return fmt.Errorf("%s: request_count %d and request_bytes %d, want %d and %d", what, g.GetRequestCount(), g.GetRequestBytes(), len(c.payloads), total)
			}
			if d := requestDigest(c.payloads); !bytes.Equal(g.GetRequestDigest(), d) {
				return fmt.Errorf("%s: request_digest %x, want %x: the requests reached the handler altered", what, g.GetRequestDigest(), d)
			}
		}
		if w.observe != (obs != nil) {
			return fmt.Errorf("%s: has an observation: %v, want %v", what, obs != nil, w.observe)
		}
		if obs != nil {
			upTo := c.payloads[:w.upTo+1]
			if d := requestDigest(upTo); !bytes.Equal(obs.GetRequestDigest(), d) {
				return fmt.Errorf("%s: observation.request_digest %x, want %x (requests 0 to %d): the requests reached the handler altered", what, obs.GetRequestDigest(), d, w.upTo)
			}
			if obs.GetRequestCount() != uint32(len(upTo)) {
				return fmt.Errorf("%s: observation.request_count %d, want %d", what, obs.GetRequestCount(), len(upTo))
			}
		}
	}
	return nil
}

// sameBytes reports how got differs from want.
func sameBytes(got, want []byte) error {
	n := min(len(got), len(want))
	for i := range n {
		if got[i] != want[i] {
			j := i
			for j < n && got[j] != want[j] {
				j++
			}
			return fmt.Errorf("of %d bytes (want %d): byte %d is 0x%02x, want 0x%02x (%d bytes differ from there)", len(got), len(want), i, got[i], want[i], j-i)
		}
	}
	if len(got) != len(want) {
		return fmt.Errorf("of %d bytes, want %d (the first %d match)", len(got), len(want), n)
	}
	return nil
}
