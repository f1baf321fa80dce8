package client

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/guilhem/operator-plugin-framework/go/auth"
	"github.com/guilhem/operator-plugin-framework/go/internal/testpki"
	"github.com/guilhem/operator-plugin-framework/go/server"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

type empty struct {
	testgrpc.UnimplementedTestServiceServer
}

func newClient(ctx context.Context, target string, opts ...Option) (*Client, error) {
	return New(ctx, "p", target, "v1", &testgrpc.TestService_ServiceDesc, empty{}, opts...)
}

func TestTokenNeedsTLS(t *testing.T) {
	dir := t.TempDir()
	ca, err := testpki.NewCA("ca")
	if err != nil {
		t.Fatal(err)
	}
	caFile := filepath.Join(dir, "ca.crt")
	if err := os.WriteFile(caFile, ca.CertPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	notPEM := filepath.Join(dir, "not.pem")
	if err := os.WriteFile(notPEM, []byte("not a certificate"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name   string
		target string
		opts   []Option
		ok     bool
	}{
		// Refused by New, before anything is dialled.
		{"token without TLS", "127.0.0.1:1", []Option{WithStaticToken("t")}, false},
		{"token over plaintext to a remote host", "192.0.2.1:1", []Option{WithStaticToken("t"), WithPlaintextToken()}, false},
		{"token over plaintext to a DNS name", "dns:///operator.invalid:443", []Option{WithStaticToken("t"), WithPlaintextToken()}, false},
		{"token with insecure credentials", "operator.invalid:1", []Option{WithStaticToken("t"), WithTransportCredentials(insecure.NewCredentials())}, false},
		{"WithTLS and WithTransportCredentials", "operator.invalid:1", []Option{WithTLS(caFile, ""), WithTransportCredentials(insecure.NewCredentials())}, false},
		{"missing CA file", "operator.invalid:1", []Option{WithTLS(filepath.Join(dir, "none"), "")}, false},
		{"CA file without certificates", "operator.invalid:1", []Option{WithTLS(notPEM, "")}, false},
		// Accepted: these dial loopback only (nothing listens on port 1).
		{"token over plaintext to loopback", "127.0.0.1:1", []Option{WithStaticToken("t"), WithPlaintextToken()}, true},
		{"token over plaintext to a unix socket", "unix:///nonexistent/x.sock", []Option{WithTokenFile("/nonexistent"), WithPlaintextToken()}, true},
		{"token over TLS", "127.0.0.1:1", []Option{WithStaticToken("t"), WithTLS(caFile, "")}, true},
		{"token over TLS, system roots", "dns:///localhost:1", []Option{WithServiceAccountToken(), WithTLS("", "operator")}, true},
		{"no token, no TLS", "127.0.0.1:1", nil, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			cl, err := newClient(ctx, c.target, c.opts...)
			if (err == nil) != c.ok {
				t.Fatalf("New: %v, want ok=%v", err, c.ok)
			}
			if cl != nil {
				cl.Close()
			}
		})
	}
}

// recorder is an authenticator that records the bearer tokens it sees.
type recorder struct {
	mu     sync.Mutex
	tokens []string
}

func (r *recorder) authenticate(ctx context.Context) (server.Identity, error) {
	tok, err := auth.BearerToken(ctx)
	if err != nil {
		return server.Identity{}, err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.tokens = append(r.tokens, tok)
	return server.Identity{User: tok}, nil
}

func (r *recorder) seen() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.tokens...)
}

func startServer(t *testing.T, addr string, opts ...server.Option) (*server.Server, func()) {
	t.Helper()
	srv, err := server.New(addr, opts...)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Start(ctx) }()
	stopped := false
	stop := func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Start: %v", err)
		}
	}
	t.Cleanup(stop)
	actx, acancel := context.WithTimeout(ctx, 5*time.Second)
	defer acancel()
	if _, err := srv.Addr(actx); err != nil {
		t.Fatal(err)
	}
	return srv, stop
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestTokenFileIsReadAtEachConnection(t *testing.T) {
	tokenFile := filepath.Join(t.TempDir(), "token")
	if err := testpki.WriteFile(tokenFile, []byte("token-1\n")); err != nil {
		t.Fatal(err)
	}
	rec := &recorder{}
	sock := filepath.Join(t.TempDir(), "s.sock")
	srv, _ := startServer(t, "unix://"+sock, server.WithAuthenticator(rec.authenticate), server.WithMaxTunnelAge(300*time.Millisecond))
	c, err := newClient(context.Background(), "unix://"+sock, WithTokenFile(tokenFile), WithPlaintextToken())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	eventually(t, "registration with token-1", func() bool { return len(rec.seen()) > 0 })
	if err := testpki.WriteFile(tokenFile, []byte("token-2")); err != nil {
		t.Fatal(err)
	}
	eventually(t, "a reconnection with token-2", func() bool {
		s := rec.seen()
		return s[len(s)-1] == "token-2"
	})
	if s := rec.seen(); s[0] != "token-1" {
		t.Fatalf("tokens %v", s)
	}
	eventually(t, "token-2 registered", func() bool {
		in := srv.GetRegistry().Plugin("p").Instances()
		return len(in) > 0 && in[len(in)-1].Identity == "token-2"
	})
}

func TestBadTokenFileFailsTheConnection(t *testing.T) {
	rec := &recorder{}
	sock := filepath.Join(t.TempDir(), "s.sock")
	startServer(t, "unix://"+sock, server.WithAuthenticator(rec.authenticate))
	c, err := newClient(context.Background(), "unix://"+sock, WithTokenFile(filepath.Join(t.TempDir(), "missing")), WithPlaintextToken())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	err = c.Ready(ctx)
	if err == nil || !strings.Contains(err.Error(), "read token") {
		t.Fatalf("Ready: %v", err)
	}
	if len(rec.seen()) != 0 {
		t.Fatal("the server saw a token")
	}
}

// A CA bundle rotated in place is trusted from the next connection on.
func TestCABundleIsReadAtEachConnection(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile, caFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key"), filepath.Join(dir, "ca.crt")
	issue := func(name string) {
		ca, err := testpki.NewCA(name)
		if err != nil {
			t.Fatal(err)
		}
		cert, key, err := ca.Issue([]string{"operator.test"}, nil)
		if err != nil {
			t.Fatal(err)
		}
		for path, data := range map[string][]byte{certFile: cert, keyFile: key, caFile: ca.CertPEM} {
			if err := testpki.WriteFile(path, data); err != nil {
				t.Fatal(err)
			}
		}
	}
	issue("ca-1")
	rec := &recorder{}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	_, stop := startServer(t, "", server.WithListener(lis), server.WithTLS(certFile, keyFile), server.WithAuthenticator(rec.authenticate))
	c, err := newClient(context.Background(), addr, WithTLS(caFile, "operator.test"), WithStaticToken("t"),
		WithBackoff(backoff.Config{BaseDelay: 50 * time.Millisecond, Multiplier: 1.2, MaxDelay: 200 * time.Millisecond}))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	rctx, rcancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer rcancel()
	if err := c.Ready(rctx); err != nil {
		t.Fatal(err)
	}

	// Another CA, and a new server with its certificate on the same
	// address: the client reconnects only if it trusts the new CA.
	issue("ca-2")
	stop()
	lis, err = net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	srv2, _ := startServer(t, "", server.WithListener(lis), server.WithTLS(certFile, keyFile), server.WithAuthenticator(rec.authenticate))
	eventually(t, "reconnection through the new CA", func() bool {
		return len(srv2.GetRegistry().List()) == 1
	})
	if got := rec.seen(); len(got) < 2 || got[len(got)-1] != "t" {
		t.Fatalf("tokens seen %v", got)
	}
}
