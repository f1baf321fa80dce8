package server_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/guilhem/operator-plugin-framework/go/client"
	"github.com/guilhem/operator-plugin-framework/go/internal/testpki"
	"github.com/guilhem/operator-plugin-framework/go/server"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

type empty struct {
	testgrpc.UnimplementedTestServiceServer
}

func (empty) EmptyCall(context.Context, *testgrpc.Empty) (*testgrpc.Empty, error) {
	return &testgrpc.Empty{}, nil
}

// start runs srv until the test ends and returns its address.
func start(t *testing.T, srv *server.Server) string {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Start(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Start: %v", err)
		}
	})
	actx, acancel := context.WithTimeout(ctx, 5*time.Second)
	defer acancel()
	addr, err := srv.Addr(actx)
	if err != nil {
		t.Fatal(err)
	}
	return addr.String()
}

type pki struct {
	dir               string
	certFile, keyFile string
	caFile            string
}

// issue writes a certificate for "operator.test" and 127.0.0.1 signed by ca.
func (p *pki) issue(t *testing.T, ca *testpki.CA) {
	t.Helper()
	cert, key, err := ca.Issue([]string{"operator.test"}, []net.IP{net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	// Key first, as a rotation that is seen half done would: the server
	// must keep the old pair until both match.
	for _, f := range []struct {
		path string
		data []byte
	}{{p.keyFile, key}, {p.certFile, cert}, {p.caFile, ca.CertPEM}} {
		if err := testpki.WriteFile(f.path, f.data); err != nil {
			t.Fatal(err)
		}
	}
}

func newPKI(t *testing.T) *pki {
	dir := t.TempDir()
	return &pki{dir: dir, certFile: filepath.Join(dir, "tls.crt"), keyFile: filepath.Join(dir, "tls.key"), caFile: filepath.Join(dir, "ca.crt")}
}

func newCA(t *testing.T, name string) *testpki.CA {
	t.Helper()
	ca, err := testpki.NewCA(name)
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

// served returns the issuer of the certificate a new TLS connection to addr
// gets.
func served(t *testing.T, addr string) string {
	t.Helper()
	conn, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	return conn.ConnectionState().PeerCertificates[0].Issuer.CommonName
}

func TestTLSCertificateReload(t *testing.T) {
	p := newPKI(t)
	p.issue(t, newCA(t, "ca-1"))
	logs := &logLines{}
	srv, err := server.New("127.0.0.1:0", server.WithTLS(p.certFile, p.keyFile), server.WithInsecureNoAuthentication(), server.WithLogger(logs.logger()))
	if err != nil {
		t.Fatal(err)
	}
	addr := start(t, srv)
	if got := served(t, addr); got != "ca-1" {
		t.Fatalf("served a certificate of %s", got)
	}
	// A plugin that trusts the CA connects.
	c, err := client.New(context.Background(), "p", addr, "v1", &testgrpc.TestService_ServiceDesc, empty{},
		client.WithTLS(p.caFile, "operator.test"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ready(t, c)

	// Half a rotation (a new key, the old certificate) keeps the old pair.
	ca2 := newCA(t, "ca-2")
	_, key2, err := ca2.Issue([]string{"operator.test"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := testpki.WriteFile(p.keyFile, key2); err != nil {
		t.Fatal(err)
	}
	if got := served(t, addr); got != "ca-1" {
		t.Fatalf("half-rotated: served a certificate of %s", got)
	}
	_ = served(t, addr)
	if n := len(logs.find(`"serving certificate not reloaded`)); n != 1 {
		t.Fatalf("%d log lines about the pair that does not load, want 1 (once per pair)", n)
	}
	// The full rotation is served to new connections.
	p.issue(t, ca2)
	if got := served(t, addr); got != "ca-2" {
		t.Fatalf("after rotation: served a certificate of %s", got)
	}
	// A missing file keeps the last pair too.
	if err := os.Remove(p.certFile); err != nil {
		t.Fatal(err)
	}
	if got := served(t, addr); got != "ca-2" {
		t.Fatalf("file gone: served a certificate of %s", got)
	}
}

func TestWithTLSRefusesBadFiles(t *testing.T) {
	p := newPKI(t)
	if _, err := server.New("127.0.0.1:0", server.WithTLS(p.certFile, p.keyFile), server.WithInsecureNoAuthentication()); err == nil {
		t.Fatal("New accepted missing certificate files")
	}
	if err := os.WriteFile(p.certFile, []byte("junk"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p.keyFile, []byte("junk"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := server.New("127.0.0.1:0", server.WithTLS(p.certFile, p.keyFile), server.WithInsecureNoAuthentication()); err == nil {
		t.Fatal("New accepted junk certificate files")
	}
}

func ready(t *testing.T, c *client.Client) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.Ready(ctx); err != nil {
		t.Fatal(err)
	}
}

// callWhileReconnecting calls the plugin in a loop for d and returns how
// many calls failed and how many distinct instances served.
func callWhileReconnecting(t *testing.T, srv *server.Server, d time.Duration) (calls, failed int, instances map[string]bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	instances = map[string]bool{}
	var mu sync.Mutex
	var ok, bad atomic.Int64
	var wg sync.WaitGroup
	for range 3 {
		wg.Go(func() {
			tc := testgrpc.NewTestServiceClient(srv.GetRegistry().Plugin("p"))
			for ctx.Err() == nil {
				cctx, ccancel := context.WithTimeout(context.Background(), 5*time.Second)
				_, err := tc.EmptyCall(cctx, &testgrpc.Empty{}, grpc.WaitForReady(true))
				ccancel()
				if err != nil {
					bad.Add(1)
					t.Errorf("call failed: %v", err)
				} else {
					ok.Add(1)
				}
				mu.Lock()
				for _, in := range srv.GetRegistry().Plugin("p").Instances() {
					instances[in.ID] = true
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return int(ok.Load() + bad.Load()), int(bad.Load()), instances
}

func TestMaxTunnelAge(t *testing.T) {
	srv, err := server.New("127.0.0.1:0", server.WithMaxTunnelAge(400*time.Millisecond), server.WithInsecureNoAuthentication())
	if err != nil {
		t.Fatal(err)
	}
	addr := start(t, srv)
	c, err := client.New(context.Background(), "p", addr, "v1", &testgrpc.TestService_ServiceDesc, empty{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ready(t, c)
	calls, failed, instances := callWhileReconnecting(t, srv, 2*time.Second)
	if failed > 0 || len(instances) < 3 {
		t.Fatalf("%d calls, %d failed, %d instances; want no failure and at least 3 instances", calls, failed, len(instances))
	}
	t.Logf("%d calls, %d instances", calls, len(instances))
}

func TestTokenExpiryDrain(t *testing.T) {
	var authns atomic.Int64
	srv, err := server.New("127.0.0.1:0",
		server.WithAuthenticator(func(ctx context.Context) (server.Identity, error) {
			authns.Add(1)
			return server.Identity{User: "u", ExpiresAt: time.Now().Add(2500 * time.Millisecond)}, nil
		}),
		// 2 s of margin on a 2.5 s lifetime: drained after 1.25 s (half of
		// what is left, since the margin leaves less than the 2 s floor).
		server.WithTokenExpiryMargin(2*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	addr := start(t, srv)
	c, err := client.New(context.Background(), "p", addr, "v1", &testgrpc.TestService_ServiceDesc, empty{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ready(t, c)
	calls, failed, instances := callWhileReconnecting(t, srv, 3*time.Second)
	if failed > 0 || len(instances) < 2 || authns.Load() < 2 {
		t.Fatalf("%d calls, %d failed, %d instances, %d authentications", calls, failed, len(instances), authns.Load())
	}
	t.Logf("%d calls, %d instances", calls, len(instances))
}

var _ = x509.NewCertPool
