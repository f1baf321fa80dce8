package hostile

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/guilhem/operator-plugin-framework/go/gen/pluginframework/v1"
)

// bounded fails the test when an attack cost the server more than
// growth MiB of resident memory over what it had before the attack
// (times raceFactor under the race detector), or more than goroutines
// goroutines at once.
func bounded(t *testing.T, m measurement, growthMiB int64, goroutines int) {
	t.Helper()
	growthMiB *= raceFactor
	if g := (m.PeakRSS - m.RSSBefore) >> 20; g > growthMiB {
		t.Errorf("%s: the server's peak RSS grew by %d MiB, want at most %d", m.Attack, g, growthMiB)
	}
	if m.MaxGoroutines > goroutines {
		t.Errorf("%s: %d goroutines at once, want at most %d", m.Attack, m.MaxGoroutines, goroutines)
	}
}

// Item 1 of issue 11: a batch of two million empty frames, before
// registration, from four tunnels three times each.
func TestBatchAmplification(t *testing.T) {
	c := startChild(t, childConfig{Mode: "anonymous"})
	cc := dial(t, c.addr, "127.0.0.2")
	batch := emptyFrames(2 << 20) // 4 MiB
	var ends sync.Map
	m := c.attack("4 tunnels x 3 batches of 2M empty frames before registration", func() {
		var wg sync.WaitGroup
		for i := range 4 {
			wg.Go(func() {
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				defer cancel()
				s, err := connect(ctx, cc)
				if err != nil {
					ends.Store(i, err)
					return
				}
				_ = s.SendMsg(encode(hello(nil)))
				for range 3 {
					if err := s.SendMsg(batch); err != nil {
						break
					}
				}
				_ = s.CloseSend()
				_, err = recvUntilEnd(s)
				ends.Store(i, err)
			})
		}
		wg.Wait()
	})
	ends.Range(func(k, v any) bool {
		t.Logf("tunnel %v: %v", k, v)
		if status.Code(v.(error)) != codes.ResourceExhausted {
			t.Errorf("tunnel %v ended with %v, want RESOURCE_EXHAUSTED", k, v)
		}
		return true
	})
	bounded(t, m, 16, 100)
	c.servesPlugins()
}

// Item 1 once registered: a batch larger than the server accepts, and
// one within its size but with more frames than the protocol allows.
func TestFramesPerBatch(t *testing.T) {
	c := startChild(t, childConfig{Mode: "anonymous"})
	cc := dial(t, c.addr, "127.0.0.2")
	ends := map[string]error{}
	m := c.attack("registered: batches of 2M and of 100,000 empty frames", func() {
		for name, frames := range map[string]int{"4 MiB": 2 << 20, "200 KB": 100_000} {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			s := registerRaw(t, ctx, cc, "framer", nil)
			batch := emptyFrames(frames)
			for range 3 {
				if err := s.SendMsg(batch); err != nil {
					break
				}
			}
			_ = s.CloseSend()
			_, ends[name] = recvUntilEnd(s)
			cancel()
		}
	})
	for name, err := range ends {
		t.Logf("%s: %v", name, err)
		if status.Code(err) != codes.ResourceExhausted {
			t.Errorf("the %s batch ended the tunnel with %v, want RESOURCE_EXHAUSTED", name, err)
		}
	}
	if msg := status.Convert(ends["200 KB"]).Message(); !strings.Contains(msg, "4096 frames") {
		t.Errorf("the batch of 100,000 frames: %q, want the frame limit", msg)
	}
	bounded(t, m, 16, 100)
	c.servesPlugins()
}

// registerRaw registers name by hand and returns the stream once the
// operator has answered with RegisterAck.
func registerRaw(t testing.TB, ctx context.Context, cc *grpc.ClientConn, name string, settings *pb.Settings) grpc.ClientStream {
	t.Helper()
	s, err := connect(ctx, cc)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.SendMsg(encode(hello(settings), register(name, "v1"))); err != nil {
		t.Fatal(err)
	}
	for {
		var m pb.ConnectResponse
		if err := s.RecvMsg(&m); err != nil {
			t.Fatalf("registering %s: %v", name, err)
		}
		for _, f := range m.GetFrames() {
			if f.GetRegisterAck() != nil {
				return s
			}
			if r := f.GetRegisterReject(); r != nil {
				t.Fatalf("registering %s: rejected: %v", name, r.GetStatus())
			}
		}
	}
}

// Item 2: a registered plugin answers a call with 200,000 empty messages
// that the operator does not read.
func TestEmptyMessages(t *testing.T) {
	c := startChild(t, childConfig{Mode: "anonymous"})
	cc := dial(t, c.addr, "127.0.0.2")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s := registerRaw(t, ctx, cc, "victim", nil)
	opened := make(chan struct{})
	go func() {
		defer close(opened)
		c.get("/open?plugin=victim&n=1")
	}()
	var id uint64
	for id == 0 {
		var m pb.ConnectResponse
		if err := s.RecvMsg(&m); err != nil {
			t.Fatal(err)
		}
		for _, f := range m.GetFrames() {
			if f.GetOpen() != nil {
				id = f.GetStreamId()
			}
		}
	}
	<-opened
	var sent int
	var end error
	m := c.attack("200,000 empty messages on one stream", func() {
		frames := []*pb.Frame{{StreamId: id, Kind: &pb.Frame_Headers{Headers: &pb.StreamHeaders{}}}}
		msg := &pb.Frame{StreamId: id, Kind: &pb.Frame_Message{Message: &pb.StreamMessage{}}}
		for sent < 200_000 {
			for len(frames) < 4000 {
				frames = append(frames, msg)
			}
			if err := s.SendMsg(&pb.ConnectRequest{Frames: frames}); err != nil {
				end = err
				break
			}
			sent += len(frames)
			frames = frames[:0]
		}
		// What the operator says back: the stream's abort, or the end.
		rctx, rcancel := context.WithTimeout(ctx, 3*time.Second)
		defer rcancel()
		go func() { <-rctx.Done(); _ = s.CloseSend() }()
		for rctx.Err() == nil {
			var m pb.ConnectResponse
			if err := s.RecvMsg(&m); err != nil {
				end = err
				break
			}
			for _, f := range m.GetFrames() {
				if st := f.GetCancel().GetStatus(); st != nil {
					end = status.ErrorProto(st)
				}
			}
			if end != nil {
				break
			}
		}
	})
	t.Logf("sent %d empty messages; operator: %v", sent, end)
	if !strings.Contains(status.Convert(end).Message(), "flow-control window exceeded") {
		t.Errorf("the operator answered %v, want the stream aborted for exceeding its window", end)
	}
	bounded(t, m, 32, 100)
	c.servesPlugins()
}

// Item 3: 25,000 Connect streams that say Hello and never register.
func TestUnregisteredFlood(t *testing.T) {
	c := startChild(t, childConfig{Mode: "anonymous"})
	const streams, conns = 25_000, 8
	var accepted, refused, other, held, maxHeld atomic.Int64
	var firstRefusal atomic.Value
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	ccs := make([]*grpc.ClientConn, conns)
	for i := range ccs {
		ccs[i] = dial(t, c.addr, fmt.Sprintf("127.0.0.%d", 2+i%4))
	}
	m := c.attack("25,000 unregistered tunnels", func() {
		var wg sync.WaitGroup
		opening := make(chan struct{}, 500) // streams being opened at once
		// Long enough for a tunnel over the limits to wait in line (5 s)
		// and then be refused.
		actx, acancel := context.WithTimeout(ctx, 8*time.Second)
		defer acancel()
		for i := range streams {
			opening <- struct{}{}
			wg.Go(func() {
				opened := false
				defer func() {
					if !opened {
						<-opening
					}
				}()
				s, err := connect(actx, ccs[i%conns])
				if err != nil {
					other.Add(1)
					return
				}
				_ = s.SendMsg(encode(hello(nil))) // on failure, RecvMsg says why
				var m pb.ConnectResponse
				if err := s.RecvMsg(&m); err != nil {
					if status.Code(err) == codes.ResourceExhausted {
						refused.Add(1)
						firstRefusal.CompareAndSwap(nil, err.Error())
					} else {
						other.Add(1)
					}
					return
				}
				accepted.Add(1)
				n := held.Add(1)
				for m := maxHeld.Load(); n > m && !maxHeld.CompareAndSwap(m, n); m = maxHeld.Load() {
				}
				opened = true
				<-opening
				// Hold it open, unregistered, until the attack ends or the
				// operator ends it.
				ended := make(chan struct{})
				go func() {
					for s.RecvMsg(&pb.ConnectResponse{}) == nil {
					}
					close(ended)
				}()
				select {
				case <-actx.Done():
				case <-ended:
				}
				held.Add(-1)
			})
		}
		wg.Wait()
	})
	t.Logf("accepted %d (%d at once at most), refused %d (%v), other %d", accepted.Load(), maxHeld.Load(), refused.Load(), firstRefusal.Load(), other.Load())
	// 4 attacking addresses, 8 unregistered tunnels each, as the server
	// counts them (its gauge).
	if m.MaxUnregistered > 32 || refused.Load() == 0 {
		t.Errorf("the server held %d unregistered tunnels at once and refused %d, want at most 32 held and the rest refused", m.MaxUnregistered, refused.Load())
	}
	bounded(t, m, 48, 2000)
	c.servesPlugins()
}

// Item 3: 2,000 HTTP/2 connections that say nothing after their preface,
// and 200 TCP connections that say nothing at all.
func TestIdleConnections(t *testing.T) {
	c := startChild(t, childConfig{Mode: "anonymous", ConnIdle: 2 * time.Second})
	var conns []net.Conn
	defer func() {
		for _, conn := range conns {
			conn.Close()
		}
	}()
	var refused int
	m := c.attack("2,000 idle HTTP/2 and 200 silent TCP connections", func() {
		d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}, Timeout: 2 * time.Second}
		for i := range 2200 {
			conn, err := d.Dial("tcp", c.addr)
			if err != nil {
				refused++
				continue
			}
			if i < 2000 {
				_, _ = io.WriteString(conn, http2.ClientPreface)
				_ = http2.NewFramer(conn, nil).WriteSettings()
			}
			conns = append(conns, conn)
		}
		time.Sleep(time.Second)
	})
	// How many does the server hold?
	held := func() int64 {
		var open atomic.Int64
		var wg sync.WaitGroup
		for _, conn := range conns {
			wg.Go(func() {
				_ = conn.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
				buf := make([]byte, 64<<10)
				for {
					if _, err := conn.Read(buf); err != nil {
						var ne net.Error
						if errors.As(err, &ne) && ne.Timeout() {
							open.Add(1)
						}
						return
					}
				}
			})
		}
		wg.Wait()
		return open.Load()
	}
	t.Logf("%d connections refused at dial, %d of %d open (some may wait to be accepted)", refused, held(), len(conns))
	// All from one address: at most 64, as the server counts them.
	if m.MaxConnections > 64 {
		t.Errorf("the server held %d connections from one address, want at most 64", m.MaxConnections)
	}
	bounded(t, m, 32, 1000)
	// A real plugin from another address connects meanwhile.
	c.servesPlugins()
	// Connections that carry no tunnel are closed once idle (2 s here,
	// then gRPC's GoAway, which waits up to 5 s for a ping's answer that
	// these connections never give).
	deadline := time.Now().Add(15 * time.Second)
	for held() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d idle connections still open 15 s after the idle timeout", held())
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// rawH2 is an HTTP/2 connection written by hand, to send what a gRPC
// client refuses to (headers over the server's limit).
type rawH2 struct {
	conn net.Conn
	fr   *http2.Framer
	mu   sync.Mutex
	next uint32
	ends chan string // what the server did to each stream, or to the connection
}

func dialH2(t testing.TB, addr, from string) *rawH2 {
	t.Helper()
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}, Timeout: 5 * time.Second}
	conn, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	if _, err := io.WriteString(conn, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	h := &rawH2{conn: conn, fr: http2.NewFramer(conn, conn), next: 1, ends: make(chan string, 1<<16)}
	h.fr.ReadMetaHeaders = hpack.NewDecoder(1<<20, nil)
	h.fr.MaxHeaderListSize = 1 << 20
	if err := h.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 30}); err != nil {
		t.Fatal(err)
	}
	go h.read()
	return h
}

func (h *rawH2) read() {
	for {
		f, err := h.fr.ReadFrame()
		if err != nil {
			h.ends <- "connection: " + err.Error()
			return
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				h.mu.Lock()
				_ = h.fr.WriteSettingsAck()
				h.mu.Unlock()
			}
		case *http2.PingFrame:
			if !f.IsAck() {
				h.mu.Lock()
				_ = h.fr.WritePing(true, f.Data)
				h.mu.Unlock()
			}
		case *http2.RSTStreamFrame:
			h.ends <- "reset: " + f.ErrCode.String()
		case *http2.GoAwayFrame:
			h.ends <- fmt.Sprintf("goaway: %v %s", f.ErrCode, f.DebugData())
		case *http2.MetaHeadersFrame:
			if st := f.PseudoValue("status"); st != "" || f.StreamEnded() {
				for _, hf := range f.RegularFields() {
					if hf.Name == "grpc-status" || hf.Name == "grpc-message" {
						h.ends <- fmt.Sprintf("stream %d: %s=%s", f.StreamID, hf.Name, hf.Value)
					}
				}
			}
		}
	}
}

// open starts a Connect stream with these extra headers, split in
// CONTINUATION frames of 16 KiB, and sends nothing else on it.
func (h *rawH2) open(addr string, extra ...hpack.HeaderField) error {
	var block strings.Builder
	enc := hpack.NewEncoder(&block)
	for _, f := range append([]hpack.HeaderField{
		{Name: ":method", Value: "POST"}, {Name: ":scheme", Value: "http"},
		{Name: ":path", Value: connectMethod}, {Name: ":authority", Value: addr},
		{Name: "content-type", Value: "application/grpc"}, {Name: "te", Value: "trailers"},
	}, extra...) {
		if err := enc.WriteField(f); err != nil {
			return err
		}
	}
	b := []byte(block.String())
	h.mu.Lock()
	defer h.mu.Unlock()
	id := h.next
	h.next += 2
	const frag = 16 << 10
	first := b[:min(frag, len(b))]
	if err := h.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: first, EndHeaders: len(b) <= frag}); err != nil {
		return err
	}
	for rest := b[len(first):]; len(rest) > 0; {
		n := min(frag, len(rest))
		if err := h.fr.WriteContinuation(id, n == len(rest), rest[:n]); err != nil {
			return err
		}
		rest = rest[n:]
	}
	return nil
}

// Item 3: headers of 1 MiB, on 8 connections of 8 streams each.
func TestHugeHeaders(t *testing.T) {
	c := startChild(t, childConfig{Mode: "anonymous"})
	junk := strings.Repeat("x", 1<<20)
	var hs []*rawH2
	var sent int
	m := c.attack("64 streams with 1 MiB headers", func() {
		for i := range 8 {
			h := dialH2(t, c.addr, "127.0.0.2")
			hs = append(hs, h)
			for range 8 {
				if err := h.open(c.addr, hpack.HeaderField{Name: "x-junk", Value: junk}); err != nil {
					t.Logf("connection %d: %v", i, err)
					break
				}
				sent++
			}
		}
		time.Sleep(2 * time.Second)
	})
	seen := map[string]int{}
	for _, h := range hs {
		for len(h.ends) > 0 {
			seen[<-h.ends]++
		}
	}
	t.Logf("sent %d; the server answered %v", sent, seen)
	for end := range seen {
		if strings.Contains(end, "grpc-status") && !strings.Contains(end, "grpc-status=8") {
			t.Errorf("a stream with 1 MiB of headers was served: %s", end)
		}
	}
	if len(seen) == 0 {
		t.Error("the server accepted every stream with 1 MiB of headers")
	}
	bounded(t, m, 32, 200)
	c.servesPlugins()
}

// Item 8: a plugin asks for an hour between heartbeats, then falls silent.
func TestHeartbeatCap(t *testing.T) {
	c := startChild(t, childConfig{Mode: "anonymous", Heartbeat: 250 * time.Millisecond})
	cc := dial(t, c.addr, "127.0.0.2")
	var took time.Duration
	var end error
	c.attack("a plugin asking for 1 h heartbeats goes silent", func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		s := registerRaw(t, ctx, cc, "sleepy", &pb.Settings{HeartbeatInterval: durationpb.New(time.Hour)})
		start := time.Now()
		// Read (HTTP/2 flow control keeps going) but never answer.
		_, end = recvUntilEnd(s)
		took = time.Since(start)
	})
	t.Logf("the operator ended the silent tunnel after %s: %v", took.Round(time.Millisecond), end)
	// Capped at twice the server's 250 ms: detected within two of those.
	if took > 1500*time.Millisecond || !strings.Contains(status.Convert(end).Message(), "heartbeat timeout") {
		t.Errorf("the silent tunnel ended after %s with %v, want a heartbeat timeout within 1 s", took, end)
	}
	c.servesPlugins()
}

// Item 9: registrations with huge fields, and the log lines they cause.
func TestHugeRegistration(t *testing.T) {
	c := startChild(t, childConfig{Mode: "anonymous"})
	cc := dial(t, c.addr, "127.0.0.2")
	ends := map[string]int{}
	m := c.attack("registrations with a 3 MiB and a 60 KiB version, 20 times each", func() {
		for _, size := range []int{3 << 20, 60 << 10} {
			version := strings.Repeat("v", size)
			for range 20 {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				s, err := connect(ctx, cc)
				if err == nil {
					_ = s.SendMsg(encode(hello(nil), register("big", version)))
					_ = s.CloseSend()
					_, err = recvUntilEnd(s)
				}
				cancel()
				ends[fmt.Sprintf("%d bytes: %v", size, status.Code(err))]++
			}
		}
	})
	t.Logf("ends: %v", ends)
	if ends["3145728 bytes: ResourceExhausted"] != 20 || ends["61440 bytes: InvalidArgument"] != 20 {
		t.Errorf("ends %v, want every 3 MiB registration RESOURCE_EXHAUSTED and every 60 KiB one INVALID_ARGUMENT", ends)
	}
	if m.LongestLine > 1024 || m.LogBytes > 64<<10 {
		t.Errorf("the server logged %d bytes, its longest line %d: a peer's values reach the log", m.LogBytes, m.LongestLine)
	}
	c.servesPlugins()
}

// Info logs from peers that never register: 5,000 refused registrations
// and 5,000 protocol errors.
func TestLogFlood(t *testing.T) {
	c := startChild(t, childConfig{Mode: "anonymous"})
	cc := dial(t, c.addr, "127.0.0.2")
	m := c.attack("5,000 refused registrations and 5,000 bad hellos", func() {
		var wg sync.WaitGroup
		sem := make(chan struct{}, 200)
		for i := range 10_000 {
			sem <- struct{}{}
			wg.Go(func() {
				defer func() { <-sem }()
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				s, err := connect(ctx, cc)
				if err != nil {
					return
				}
				if i%2 == 0 {
					_ = s.SendMsg(encode(hello(nil), register("", "v1"))) // no name
				} else {
					_ = s.SendMsg(encode(&pb.Frame{Kind: &pb.Frame_Hello{Hello: &pb.Hello{MinVersion: 1, MaxVersion: 1}}}))
				}
				_ = s.CloseSend()
				_, _ = recvUntilEnd(s)
			})
		}
		wg.Wait()
	})
	// A few messages (4), each at most 20 lines and then 5 a second.
	elapsed, _ := time.ParseDuration(m.Elapsed)
	if limit := 4*(20+int64(5*elapsed.Seconds())) + 10; m.LogLines > limit || m.LogBytes > limit*300 {
		t.Errorf("10,000 refused tunnels made %d log lines (%d bytes) in %s, want at most %d lines", m.LogLines, m.LogBytes, m.Elapsed, limit)
	}
	c.servesPlugins()
}

// fakeJWT is an unsigned token shaped like a ServiceAccount token for
// audience, valid for an hour: it passes any check short of the
// signature.
func fakeJWT(audience string) string {
	enc := base64.RawURLEncoding.EncodeToString
	nonce := make([]byte, 8)
	_, _ = rand.Read(nonce)
	claims, _ := json.Marshal(map[string]any{
		"aud": []string{audience}, "exp": time.Now().Add(time.Hour).Unix(), "iat": time.Now().Unix(),
		"iss": "https://kubernetes.default.svc", "sub": "system:serviceaccount:x:" + enc(nonce),
	})
	return enc([]byte(`{"alg":"RS256","kid":"k"}`)) + "." + enc(claims) + "." + enc(nonce)
}

func randomToken() string {
	b := make([]byte, 24)
	_, _ = rand.Read(b)
	return base64.RawURLEncoding.EncodeToString(b)
}

// connectWithToken opens a Connect stream with a bearer token, says
// Hello, and returns how it ended (nil: the operator answered).
func connectWithToken(ctx context.Context, cc *grpc.ClientConn, token string) error {
	ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
	s, err := connect(ctx, cc)
	if err != nil {
		return err
	}
	_ = s.SendMsg(encode(hello(nil)))
	var m pb.ConnectResponse
	err = s.RecvMsg(&m)
	_ = s.CloseSend()
	return err
}

// kubeChild starts a child in the built-in mode against a real API
// server, or skips without one.
func kubeChild(t *testing.T, delay time.Duration) *child {
	t.Helper()
	kc := startAPIServer(t)
	return startChild(t, childConfig{Mode: "builtin", Kubeconfig: kc, Audience: testAudience, ReviewDelay: delay})
}

// Item 4: 3,000 tunnels with random tokens, opaque and JWT-shaped.
func TestTokenReviewFlood(t *testing.T) {
	c := kubeChild(t, 0)
	for _, kind := range []struct {
		name  string
		token func() string
	}{{"random opaque", randomToken}, {"random JWT-shaped", func() string { return fakeJWT(testAudience) }}} {
		cc := dial(t, c.addr, "127.0.0.2")
		codesSeen := map[codes.Code]int{}
		var mu sync.Mutex
		m := c.attack("3,000 tunnels with "+kind.name+" tokens", func() {
			var wg sync.WaitGroup
			sem := make(chan struct{}, 300)
			for range 3000 {
				sem <- struct{}{}
				wg.Go(func() {
					defer func() { <-sem }()
					ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
					defer cancel()
					err := connectWithToken(ctx, cc, kind.token())
					mu.Lock()
					codesSeen[status.Code(err)]++
					mu.Unlock()
				})
			}
			wg.Wait()
		})
		t.Logf("%s: %v", kind.name, codesSeen)
		if codesSeen[codes.OK] > 0 {
			t.Errorf("%d tunnels with made-up tokens were served", codesSeen[codes.OK])
		}
		// Opaque tokens cost no review; JWT-shaped ones, from one peer,
		// its budget: a burst of 10, then 2 a second.
		elapsed, _ := time.ParseDuration(m.Elapsed)
		if limit := int64(0); kind.name == "random opaque" && m.TokenReviews != limit {
			t.Errorf("%d TokenReviews for tokens that are not JWTs, want none", m.TokenReviews)
		} else if limit := 10 + int64(2*elapsed.Seconds()) + 1; m.TokenReviews > limit {
			t.Errorf("%d TokenReviews from one peer in %s, want at most %d", m.TokenReviews, m.Elapsed, limit)
		}
		bounded(t, m, 32, 1000)
	}
	c.servesPluginsWithToken(t)
}

// Item 4: 500 concurrent tunnels with one bad token.
func TestSameBadToken(t *testing.T) {
	c := kubeChild(t, 0)
	// From 64 addresses, so that the per-peer limits let many reach the
	// authentication at once.
	ccs := make([]*grpc.ClientConn, 64)
	for i := range ccs {
		ccs[i] = dial(t, c.addr, fmt.Sprintf("127.0.1.%d", i+1))
	}
	token := fakeJWT(testAudience)
	var authenticated atomic.Int64 // reached the review: refused as invalid
	m := c.attack("500 concurrent tunnels with one bad token", func() {
		var wg sync.WaitGroup
		start := make(chan struct{})
		for i := range 500 {
			wg.Go(func() {
				<-start
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				defer cancel()
				if err := connectWithToken(ctx, ccs[i%len(ccs)], token); status.Code(err) == codes.Unauthenticated {
					authenticated.Add(1)
				}
			})
		}
		close(start)
		wg.Wait()
	})
	t.Logf("%d tunnels refused as unauthenticated", authenticated.Load())
	if m.TokenReviews != 1 || authenticated.Load() < 64 {
		t.Errorf("%d TokenReviews for %d tunnels refused with one token, want 1 for at least 64", m.TokenReviews, authenticated.Load())
	}
	c.servesPluginsWithToken(t)
}

// Item 4: a slow API server (5 s a review) and 300 streams carrying 1 MiB
// headers and a token each.
func TestSlowAPIServer(t *testing.T) {
	c := kubeChild(t, 5*time.Second)
	junk := strings.Repeat("x", 1<<20)
	seen := map[string]int{}
	m := c.attack("300 streams with 1 MiB headers while reviews take 5 s", func() {
		var hs []*rawH2
		for i := range 30 {
			h := dialH2(t, c.addr, fmt.Sprintf("127.0.0.%d", 2+i%8))
			hs = append(hs, h)
			for range 10 {
				if err := h.open(c.addr, hpack.HeaderField{Name: "authorization", Value: "Bearer " + fakeJWT(testAudience)}, hpack.HeaderField{Name: "x-junk", Value: junk}); err != nil {
					break
				}
			}
		}
		time.Sleep(3 * time.Second)
		for _, h := range hs {
			for len(h.ends) > 0 {
				seen[<-h.ends]++
			}
		}
	})
	t.Logf("the server answered %v", seen)
	if m.TokenReviews != 0 {
		t.Errorf("%d TokenReviews for streams whose headers are over the limit", m.TokenReviews)
	}
	bounded(t, m, 32, 500)

	// The same with small headers: at most 16 reviews wait at once, the
	// others are refused at once.
	var codesSeen sync.Map
	m = c.attack("300 tunnels with JWT-shaped tokens while reviews take 5 s", func() {
		var wg sync.WaitGroup
		ccs := make([]*grpc.ClientConn, 100)
		for i := range ccs {
			ccs[i] = dial(t, c.addr, fmt.Sprintf("127.0.2.%d", 1+i))
		}
		for i := range 300 {
			cc := ccs[i%len(ccs)]
			wg.Go(func() {
				ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
				defer cancel()
				err := connectWithToken(ctx, cc, fakeJWT(testAudience))
				n, _ := codesSeen.LoadOrStore(status.Code(err), new(atomic.Int64))
				n.(*atomic.Int64).Add(1)
			})
		}
		wg.Wait()
	})
	codesSeen.Range(func(k, v any) bool { t.Logf("%v: %d", k, v.(*atomic.Int64).Load()); return true })
	if m.TokenReviews > 16 {
		t.Errorf("%d TokenReviews under way with a slow API server, want at most 16", m.TokenReviews)
	}
	bounded(t, m, 48, 1500)
	c.get("/delay?d=0")
	c.servesPluginsWithToken(t)
}

// servesPluginsWithToken is servesPlugins with a real token.
func (c *child) servesPluginsWithToken(t *testing.T) {
	t.Helper()
	file := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(file, []byte(pluginToken(t)), 0o600); err != nil {
		t.Fatal(err)
	}
	c.servesPlugins(tokenOptions(file)...)
}
