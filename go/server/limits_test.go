package server_test

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/go-logr/logr/funcr"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"
	"sigs.k8s.io/controller-runtime/pkg/log"

	"github.com/guilhem/operator-plugin-framework/go/client"
	"github.com/guilhem/operator-plugin-framework/go/server"
)

func TestTCPWithoutAuthenticatorIsRefused(t *testing.T) {
	if _, err := server.New("127.0.0.1:0"); err == nil || !strings.Contains(err.Error(), "WithInsecureNoAuthentication") {
		t.Fatalf("New on TCP without an authenticator: %v, want a refusal naming the option", err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	if _, err := server.New("", server.WithListener(lis)); err == nil {
		t.Fatal("New accepted a TCP listener without an authenticator")
	}
	for _, ok := range [][]server.Option{
		{server.WithInsecureNoAuthentication()},
		{server.WithAuthenticator(func(context.Context) (server.Identity, error) { return server.Identity{}, nil })},
	} {
		if _, err := server.New("127.0.0.1:0", ok...); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := server.New("unix://" + filepath.Join(t.TempDir(), "s.sock")); err != nil {
		t.Fatalf("unix socket: %v", err)
	}
}

func TestStartTwice(t *testing.T) {
	srv, err := server.New("unix://" + filepath.Join(t.TempDir(), "s.sock"))
	if err != nil {
		t.Fatal(err)
	}
	start(t, srv)
	if err := srv.Start(context.Background()); err == nil {
		t.Fatal("a second Start returned no error")
	}
}

func TestAddrReturnsListenError(t *testing.T) {
	srv, err := server.New("unix:///nonexistent-dir-of-opf-test/s.sock")
	if err != nil {
		t.Fatal(err)
	}
	startErr := srv.Start(context.Background())
	if startErr == nil {
		t.Fatal("Start listened in a directory that does not exist")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := srv.Addr(ctx); err == nil || errors.Is(err, context.DeadlineExceeded) || err.Error() != startErr.Error() {
		t.Fatalf("Addr: %v, want Start's error %v", err, startErr)
	}
}

func TestRequireTLS(t *testing.T) {
	authn := server.WithAuthenticator(func(context.Context) (server.Identity, error) { return server.Identity{}, nil })
	lis, err := net.Listen("tcp", ":0") // every interface: not only loopback
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	srv, err := server.New("", server.WithListener(lis), authn, server.WithRequireTLS())
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(context.Background()); err == nil || !strings.Contains(err.Error(), "WithTLS") {
		t.Fatalf("Start on every interface without TLS: %v, want a refusal", err)
	}
	// Loopback and unix sockets are fine without TLS.
	srv, err = server.New("127.0.0.1:0", authn, server.WithRequireTLS())
	if err != nil {
		t.Fatal(err)
	}
	start(t, srv)
}

// switchable accepts or refuses, as told, with the status code given.
type switchable struct {
	refuse atomic.Int32 // a codes.Code, 0: accept
	calls  atomic.Int64
	revals atomic.Int64
}

func (s *switchable) authenticate(ctx context.Context) (server.Identity, error) {
	s.calls.Add(1)
	if server.IsRevalidation(ctx) {
		s.revals.Add(1)
	}
	if c := codes.Code(s.refuse.Load()); c != codes.OK {
		return server.Identity{}, status.Error(c, "told to refuse")
	}
	return server.Identity{User: "u"}, nil // no expiry: as a non-JWT token
}

func TestRevalidation(t *testing.T) {
	auth := &switchable{}
	srv, err := server.New("unix://"+filepath.Join(t.TempDir(), "s.sock"),
		server.WithAuthenticator(auth.authenticate), server.WithRevalidationInterval(100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	addr := "unix://" + start(t, srv)
	c, err := client.New(context.Background(), "p", addr, "v1", &testgrpc.TestService_ServiceDesc, empty{},
		client.WithLogger(logr.Discard()))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ready(t, c)
	first := c.InstanceID()

	// The API server cannot decide: the tunnel stays.
	auth.refuse.Store(int32(codes.Unavailable))
	time.Sleep(400 * time.Millisecond)
	if got := srv.GetRegistry().Plugin("p").Instances(); len(got) != 1 || got[0].ID != first {
		t.Fatalf("a revalidation that could not decide dropped the tunnel: %+v", got)
	}
	if auth.revals.Load() == 0 {
		t.Fatal("no revalidation ran")
	}
	// The credentials are revoked: the tunnel is drained, and the plugin
	// cannot come back.
	auth.refuse.Store(int32(codes.Unauthenticated))
	eventually(t, 2*time.Second, "the revoked tunnel leaves the registry", func() bool {
		return len(srv.GetRegistry().Plugin("p").Instances()) == 0
	})
	time.Sleep(300 * time.Millisecond)
	if n := len(srv.GetRegistry().Plugin("p").Instances()); n != 0 {
		t.Fatalf("%d instances after the revocation", n)
	}
	// Valid again: it registers again.
	auth.refuse.Store(0)
	ready(t, c)
}

func TestNoRevalidationWithoutAuthenticator(t *testing.T) {
	srv, err := server.New("unix://"+filepath.Join(t.TempDir(), "s.sock"), server.WithRevalidationInterval(50*time.Millisecond),
		server.WithRegistrationPolicy(func(ctx context.Context, _ server.Identity, _ server.Registration) error {
			if server.IsRevalidation(ctx) {
				t.Error("a policy ran again without an authenticator")
			}
			return nil
		}))
	if err != nil {
		t.Fatal(err)
	}
	addr := "unix://" + start(t, srv)
	c, err := client.New(context.Background(), "p", addr, "v1", &testgrpc.TestService_ServiceDesc, empty{}, client.WithLogger(logr.Discard()))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ready(t, c)
	time.Sleep(200 * time.Millisecond)
}

func eventually(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out: %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestLocalProxy(t *testing.T) {
	authn := server.WithAuthenticator(func(context.Context) (server.Identity, error) { return server.Identity{User: "u"}, nil })
	for _, addr := range []string{":0", "127.0.0.2:0", "unix://" + filepath.Join(t.TempDir(), "s.sock")} {
		srv, err := server.New(addr, authn, server.WithLocalProxy(server.AnyUID))
		if err != nil {
			t.Fatal(err)
		}
		if err := srv.Start(context.Background()); err == nil || !strings.Contains(err.Error(), "exactly 127.0.0.1") {
			t.Errorf("WithLocalProxy on %s: %v, want a refusal", addr, err)
		}
	}

	// dialFrom reports whether the server keeps a connection from src.
	kept := func(addr, src string) bool {
		d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
		conn, err := d.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		_ = conn.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		buf := make([]byte, 1024)
		for {
			if _, err = conn.Read(buf); err != nil {
				break // the server's HTTP/2 settings come first, if it kept the connection
			}
		}
		var ne net.Error
		return errors.As(err, &ne) && ne.Timeout() // still open
	}
	for _, c := range []struct {
		uid       int
		src       string
		wantKept  bool
		condition string
	}{
		{server.AnyUID, "127.0.0.1", true, "any user, from 127.0.0.1"},
		{server.AnyUID, "127.0.0.6", false, "any user, from 127.0.0.6"},
		{os.Getuid(), "127.0.0.1", true, "our user, from 127.0.0.1"},
		{os.Getuid() + 1, "127.0.0.1", false, "another user, from 127.0.0.1"},
	} {
		t.Run(c.condition, func(t *testing.T) {
			srv, err := server.New("127.0.0.1:0", authn, server.WithLocalProxy(c.uid))
			if err != nil {
				t.Fatal(err)
			}
			addr := start(t, srv)
			if got := kept(addr, c.src); got != c.wantKept {
				t.Fatalf("connection kept: %v, want %v", got, c.wantKept)
			}
		})
	}
}

// logLines is a logger that keeps its lines.
type logLines struct {
	mu    sync.Mutex
	lines []string
}

func (l *logLines) logger() logr.Logger {
	return funcr.New(func(prefix, args string) {
		l.mu.Lock()
		defer l.mu.Unlock()
		l.lines = append(l.lines, args)
	}, funcr.Options{})
}

func (l *logLines) find(substr ...string) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	for _, line := range l.lines {
		all := true
		for _, s := range substr {
			all = all && strings.Contains(line, s)
		}
		if all {
			out = append(out, line)
		}
	}
	return out
}

// The logger of Start's context (controller-runtime's, by default) sees a
// refused registration, and every end of a tunnel says why in words.
func TestLogsWithoutExtraCode(t *testing.T) {
	logs := &logLines{}
	srv, err := server.New("unix://"+filepath.Join(t.TempDir(), "s.sock"),
		server.WithRegistrationPolicy(func(_ context.Context, _ server.Identity, r server.Registration) error {
			if r.Name == "refused" {
				return status.Error(codes.PermissionDenied, "not this one")
			}
			return nil
		}))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(log.IntoContext(context.Background(), logs.logger()))
	done := make(chan error, 1)
	go func() { done <- srv.Start(ctx) }()
	actx, acancel := context.WithTimeout(ctx, 5*time.Second)
	a, err := srv.Addr(actx)
	acancel()
	if err != nil {
		t.Fatal(err)
	}
	addr := "unix://" + a.String()
	plugin := func(name string) *client.Client {
		c, err := client.New(context.Background(), name, addr, "v1", &testgrpc.TestService_ServiceDesc, empty{}, client.WithLogger(logr.Discard()))
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	refused := plugin("refused")
	eventually(t, 5*time.Second, "the refusal is logged", func() bool {
		return len(logs.find(`"registration refused"`, `"not this one"`)) > 0
	})
	refused.Close()

	leaving := plugin("leaving")
	ready(t, leaving)
	leaving.Close() // the plugin drains
	staying := plugin("staying")
	ready(t, staying)
	cancel() // the operator drains
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	staying.Close()
	for name, want := range map[string]string{"leaving": "drained by the plugin", "staying": "drained by the operator: operator shutting down"} {
		lines := logs.find(`"plugin unregistered"`, `"plugin"="`+name+`"`)
		if len(lines) != 1 || !strings.Contains(lines[0], `"reason"="`+want+`"`) {
			t.Errorf("%s: %q, want one line with the reason %q", name, lines, want)
		}
	}
	if null := logs.find(`"reason"=null`); len(null) > 0 {
		t.Errorf("lines without a reason: %q", null)
	}
}
