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

// Item 1 of issue 11: a batch of two million empty frames, before
// registration, from four tunnels three times each.
func TestBatchAmplification(t *testing.T) {
	c := startChild(t, childConfig{Mode: "anonymous"})
	cc := dial(t, c.addr, "127.0.0.2")
	batch := emptyFrames(2 << 20) // 4 MiB
	var ends sync.Map
	c.attack("4 tunnels x 3 batches of 2M empty frames before registration", func() {
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
	ends.Range(func(k, v any) bool { t.Logf("tunnel %v: %v", k, v); return true })
	c.servesPlugins()
}

// Item 1 once registered: a batch of more frames than the protocol allows.
func TestFramesPerBatch(t *testing.T) {
	c := startChild(t, childConfig{Mode: "anonymous"})
	cc := dial(t, c.addr, "127.0.0.2")
	var end error
	c.attack("registered: 3 batches of 2M empty frames", func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		s := registerRaw(t, ctx, cc, "framer", nil)
		batch := emptyFrames(2 << 20)
		for range 3 {
			if err := s.SendMsg(batch); err != nil {
				break
			}
		}
		_ = s.CloseSend()
		_, end = recvUntilEnd(s)
	})
	t.Logf("end: %v", end)
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
	c.attack("200,000 empty messages on one stream", func() {
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
	c.servesPlugins()
}

// Item 3: 25,000 Connect streams that say Hello and never register.
func TestUnregisteredFlood(t *testing.T) {
	c := startChild(t, childConfig{Mode: "anonymous"})
	const streams, conns = 25_000, 8
	var accepted, refused, other atomic.Int64
	var firstRefusal atomic.Value
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	ccs := make([]*grpc.ClientConn, conns)
	for i := range ccs {
		ccs[i] = dial(t, c.addr, fmt.Sprintf("127.0.0.%d", 2+i%4))
	}
	c.attack("25,000 unregistered tunnels", func() {
		var wg sync.WaitGroup
		opening := make(chan struct{}, 500) // streams being opened at once
		actx, acancel := context.WithTimeout(ctx, 5*time.Second)
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
				opened = true
				<-opening
				<-actx.Done() // hold it open, unregistered
			})
		}
		wg.Wait()
	})
	t.Logf("accepted %d, refused %d (%v), other %d", accepted.Load(), refused.Load(), firstRefusal.Load(), other.Load())
	c.servesPlugins()
}

// Item 3: 2,000 HTTP/2 connections that say nothing after their preface,
// and 200 TCP connections that say nothing at all.
func TestIdleConnections(t *testing.T) {
	c := startChild(t, childConfig{Mode: "anonymous"})
	var conns []net.Conn
	defer func() {
		for _, conn := range conns {
			conn.Close()
		}
	}()
	var refused int
	c.attack("2,000 idle HTTP/2 and 200 silent TCP connections", func() {
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
	// How many does the server still hold, 3 s later?
	time.Sleep(2 * time.Second)
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
	t.Logf("%d connections refused at dial, %d of %d still open 3 s later", refused, open.Load(), len(conns))
	c.servesPlugins()
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
	c.attack("64 streams with 1 MiB headers", func() {
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
	c.servesPlugins()
}

// Item 9: registrations with huge fields, and the log lines they cause.
func TestHugeRegistration(t *testing.T) {
	c := startChild(t, childConfig{Mode: "anonymous"})
	cc := dial(t, c.addr, "127.0.0.2")
	ends := map[string]int{}
	c.attack("registrations with a 3 MiB and a 60 KiB version, 20 times each", func() {
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
	c.servesPlugins()
}

// Info logs from peers that never register: 5,000 refused registrations
// and 5,000 protocol errors.
func TestLogFlood(t *testing.T) {
	c := startChild(t, childConfig{Mode: "anonymous"})
	cc := dial(t, c.addr, "127.0.0.2")
	c.attack("5,000 refused registrations and 5,000 bad hellos", func() {
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
		c.attack("3,000 tunnels with "+kind.name+" tokens", func() {
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
	}
	c.servesPluginsWithToken(t)
}

// Item 4: 500 concurrent tunnels with one bad token.
func TestSameBadToken(t *testing.T) {
	c := kubeChild(t, 0)
	cc := dial(t, c.addr, "127.0.0.2")
	token := fakeJWT(testAudience)
	c.attack("500 concurrent tunnels with one bad token", func() {
		var wg sync.WaitGroup
		start := make(chan struct{})
		for range 500 {
			wg.Go(func() {
				<-start
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				defer cancel()
				_ = connectWithToken(ctx, cc, token)
			})
		}
		close(start)
		wg.Wait()
	})
	c.servesPluginsWithToken(t)
}

// Item 4: a slow API server (5 s a review) and 300 streams carrying 1 MiB
// headers and a token each.
func TestSlowAPIServer(t *testing.T) {
	c := kubeChild(t, 5*time.Second)
	junk := strings.Repeat("x", 1<<20)
	seen := map[string]int{}
	c.attack("300 streams with 1 MiB headers while reviews take 5 s", func() {
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
