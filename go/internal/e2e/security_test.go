package e2e

import (
	"context"
	"crypto/sha256"
	"fmt"
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
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	authzv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/metrics"

	"github.com/guilhem/operator-plugin-framework/go/auth"
	"github.com/guilhem/operator-plugin-framework/go/client"
	"github.com/guilhem/operator-plugin-framework/go/internal/testpki"
	"github.com/guilhem/operator-plugin-framework/go/registry"
	"github.com/guilhem/operator-plugin-framework/go/server"
)

// serverName is the name in the operator's certificate: its Service's.
const serverName = "opf-plugin-server.opf-system.svc"

// TestSecurity runs the operator's server in both modes against a real API
// server and real plugins.
func TestSecurity(t *testing.T) {
	c := startCluster(t)
	tk := c.tokens(t)
	t.Run("BuiltIn", func(t *testing.T) {
		testMode(t, c, tk, startBuiltIn)
		t.Run("tunnels are drained before their token expires", func(t *testing.T) { expiryDrainBuiltIn(t, c) })
		t.Run("the tunnel of a deleted ServiceAccount is drained", func(t *testing.T) { deletedServiceAccount(t, c) })
	})
	t.Run("KubeRBACProxy", func(t *testing.T) {
		testMode(t, c, tk, startBehindProxy)
		t.Run("tunnels are drained at their maximum age", func(t *testing.T) { maxAgeBehindProxy(t, c) })
		t.Run("only the proxy can vouch for an identity", func(t *testing.T) { forgedIdentity(t, c, tk) })
	})
}

// endpoint is a running operator as plugins see it.
type endpoint struct {
	srv        *server.Server
	target     string
	upstream   string // behind the proxy: the server's own address
	caFile     string
	serverName string
	logs       *syncBuffer // the server's log
	proxyPID   int         // behind the proxy: the proxy's process
}

// pki is a CA and a serving certificate for serverName and 127.0.0.1, in
// files.
type pki struct {
	caFile, certFile, keyFile string
}

func newPKI(t testing.TB, caName string) *pki {
	t.Helper()
	return newPKIIn(t, t.TempDir(), caName)
}

func newPKIIn(t testing.TB, dir, caName string) *pki {
	t.Helper()
	p := &pki{caFile: filepath.Join(dir, "ca.crt"), certFile: filepath.Join(dir, "tls.crt"), keyFile: filepath.Join(dir, "tls.key")}
	if _, err := p.rotate(caName, nil); err != nil {
		t.Fatal(err)
	}
	return p
}

// rotate issues a new serving certificate from a new CA. The CA file
// gets the new CA, after those in keep. It returns the new CA.
func (p *pki) rotate(caName string, keep []byte) ([]byte, error) {
	ca, err := testpki.NewCA(caName)
	if err != nil {
		return nil, err
	}
	cert, key, err := ca.Issue([]string{serverName}, []net.IP{net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return nil, err
	}
	bundle := append(append([]byte(nil), keep...), ca.CertPEM...)
	// The CA first, so that plugins trust the new certificate before it is
	// served.
	for _, f := range []struct {
		path string
		data []byte
	}{{p.caFile, bundle}, {p.keyFile, key}, {p.certFile, cert}} {
		if err := testpki.WriteFile(f.path, f.data); err != nil {
			return nil, err
		}
	}
	return ca.CertPEM, nil
}

// runServer starts an operator's plugin server until the test ends.
func runServer(t testing.TB, addr string, opts ...server.Option) (*server.Server, string, *syncBuffer) {
	t.Helper()
	srv, err := server.New(addr, opts...)
	if err != nil {
		t.Fatal(err)
	}
	logs := &syncBuffer{}
	lg := funcr.New(func(prefix, args string) { fmt.Fprintln(logs, prefix, args) }, funcr.Options{Verbosity: 1})
	ctx, cancel := context.WithCancel(log.IntoContext(context.Background(), lg))
	done := make(chan error, 1)
	go func() { done <- srv.Start(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("server: %v", err)
		}
		if t.Failed() {
			t.Logf("server log:\n%s", logs.String())
		}
	})
	actx, acancel := context.WithTimeout(ctx, 10*time.Second)
	defer acancel()
	a, err := srv.Addr(actx)
	if err != nil {
		t.Fatal(err)
	}
	return srv, a.String(), logs
}

func operatorClient(c *cluster) kubernetes.Interface {
	return kubernetes.NewForConfigOrDie(c.operator)
}

// startBuiltIn runs the built-in mode: TLS, TokenReview and
// SubjectAccessReview in the server, as auth.BuiltIn sets them up.
func startBuiltIn(t testing.TB, c *cluster, extra ...server.Option) *endpoint {
	t.Helper()
	p := newPKI(t, "operator-ca-1")
	opts, err := auth.BuiltIn(operatorClient(c), []string{c.audience})
	if err != nil {
		t.Fatal(err)
	}
	opts = append(opts, server.WithTLS(p.certFile, p.keyFile))
	srv, addr, logs := runServer(t, "127.0.0.1:0", append(opts, extra...)...)
	return &endpoint{srv: srv, target: addr, caFile: p.caFile, serverName: serverName, logs: logs}
}

// startBehindProxy runs the sidecar mode: the server on loopback h2c,
// kube-rbac-proxy in front of it with config/kube-rbac-proxy's arguments,
// as the user config/kube-rbac-proxy runs it as (when the test runs as
// root; otherwise as the test's user, and the server checks only the
// proxy's address).
func startBehindProxy(t testing.TB, c *cluster, extra ...server.Option) *endpoint {
	t.Helper()
	uid := proxyUID(t)
	opts, err := auth.BehindKubeRBACProxy(operatorClient(c), auth.ProxyUID(uid))
	if err != nil {
		t.Fatal(err)
	}
	srv, upstream, logs := runServer(t, "127.0.0.1:0", append(opts, extra...)...)
	listen, caFile, pid := c.proxyFor(t, upstream, uid)
	return &endpoint{srv: srv, target: listen, upstream: upstream, caFile: caFile, serverName: serverName, logs: logs, proxyPID: pid}
}

// proxyFor starts kube-rbac-proxy, with config/kube-rbac-proxy's
// arguments and a certificate of its own, in front of the h2c server at
// upstream, as uid, until the test ends. It returns the proxy's address,
// the file of the CA its certificate comes from and its process id.
func (c *cluster) proxyFor(t testing.TB, upstream string, uid int) (listen, caFile string, pid int) {
	t.Helper()
	dir := readableDir(t)
	p := newPKIIn(t, dir, "proxy-ca")
	for _, f := range []string{p.certFile, p.keyFile} {
		if err := os.Chmod(f, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	listen = freeAddr(t)
	pid = startProxy(t, c.rbacProxy, listen, uid, proxyArgs(t, listen, "http://"+upstream+"/", p.certFile, p.keyFile, c.kubeconfigIn(t, dir)))
	return listen, p.caFile, pid
}

var fastBackoff = backoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.5, Jitter: 0.1, MaxDelay: time.Second}

// newPlugin starts a real plugin with a token file, trusting ep's CA.
func newPlugin(t *testing.T, ep *endpoint, name, tokenFile string, svc *testService, lg logr.Logger) *client.Client {
	t.Helper()
	c, err := client.New(context.Background(), name, ep.target, "v1.0.0", &testgrpc.TestService_ServiceDesc, svc,
		client.WithTokenFile(tokenFile),
		client.WithTLS(ep.caFile, ep.serverName),
		client.WithBackoff(fastBackoff),
		client.WithLogger(lg))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func waitReady(t *testing.T, c *client.Client) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if err := c.Ready(ctx); err != nil {
		t.Fatal(err)
	}
}

func instanceIDs(reg *registry.Registry, name string) []string {
	var ids []string
	for _, in := range reg.Plugin(name).Instances() {
		ids = append(ids, in.ID)
	}
	return ids
}

// testMode checks authentication, authorization and name binding.
func testMode(t *testing.T, c *cluster, tk *tokens, start func(testing.TB, *cluster, ...server.Option) *endpoint) {
	ep := start(t, c)
	creds := tlsCreds(t, ep.caFile, ep.serverName)

	t.Run("every bad credential is refused with its precise status", func(t *testing.T) {
		for _, tc := range []struct {
			name, token string
			code        codes.Code
		}{
			{"no token", "", codes.Unauthenticated},
			{"garbage token", tk.garbage, codes.Unauthenticated},
			{"tampered token", tk.tampered, codes.Unauthenticated},
			{"token for another audience", tk.wrongAudience, codes.Unauthenticated},
			{"token for the API server", tk.apiAudience, codes.Unauthenticated},
			{"expired token", tk.expired, codes.Unauthenticated},
			{"valid identity without RBAC", tk.noRBAC, codes.PermissionDenied},
		} {
			t.Run(tc.name, func(t *testing.T) {
				r := rawConnect(t, ep.target, creds, tc.token, pluginName)
				if r.acked || r.final.Code() != tc.code {
					t.Fatalf("got acked=%v %v, want %v", r.acked, r.final, tc.code)
				}
				t.Logf("%v: %s", r.final.Code(), r.final.Message())
			})
		}
		// The same path with ordinary generated code and a good token
		// registers: the refusals above are about the credentials alone.
		if r := rawConnect(t, ep.target, creds, tk.good, pluginName); !r.acked {
			t.Fatalf("good token: %v", r)
		}
		// A real plugin with a bad token never registers, and learns why.
		bad := filepath.Join(t.TempDir(), "token")
		if err := os.WriteFile(bad, []byte(tk.expired), 0o600); err != nil {
			t.Fatal(err)
		}
		errs := &errorLog{}
		p := newPlugin(t, ep, pluginName, bad, newTestService(), errs.logger())
		ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
		defer cancel()
		if err := p.Ready(ctx); err == nil {
			t.Fatal("a plugin with an expired token registered")
		}
		p.Close()
		if !hasCode(errs.all(), codes.Unauthenticated) {
			t.Fatalf("the plugin's errors %v include no UNAUTHENTICATED", errs.all())
		}
	})

	t.Run("the allowed plugin serves every kind of call", func(t *testing.T) {
		p := newPlugin(t, ep, pluginName, tk.goodFile, newTestService(), logr.Discard())
		waitReady(t, p)
		// The plugin is registered once it has the operator's answer; the
		// operator lists it right after sending it.
		eventuallyTrue(t, 5*time.Second, "the registry lists the plugin", func() bool {
			return len(ep.srv.GetRegistry().Plugin(pluginName).Instances()) > 0
		})
		insts := ep.srv.GetRegistry().Plugin(pluginName).Instances()
		if len(insts) != 1 || insts[0].Identity != pluginUser || insts[0].ID != p.InstanceID() {
			t.Fatalf("registry holds %+v, want one instance of %s", insts, pluginUser)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := everyKind(ctx, testgrpc.NewTestServiceClient(ep.srv.GetRegistry().Plugin(pluginName))); err != nil {
			t.Fatal(err)
		}

		t.Run("a name the identity may not register is refused and the plugin is untouched", func(t *testing.T) {
			before := instanceIDs(ep.srv.GetRegistry(), pluginName)
			for _, tc := range []struct{ who, token, name string }{
				{"another ServiceAccount, the plugin's name", tk.intruder, pluginName},
				{"the plugin's ServiceAccount, another name", tk.good, "other-plugin"},
			} {
				r := rawConnect(t, ep.target, creds, tc.token, tc.name)
				if r.acked || r.reject.Code() != codes.PermissionDenied || r.final.Code() != codes.PermissionDenied {
					t.Fatalf("%s: got %v, want a PERMISSION_DENIED RegisterReject", tc.who, r)
				}
				t.Logf("%s: %v", tc.who, r.reject.Message())
			}
			// A real plugin of the intruder, under the same name.
			errs := &errorLog{}
			intruder := newPlugin(t, ep, pluginName, tk.intruderFile, newTestService(), errs.logger())
			ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
			defer cancel()
			if err := intruder.Ready(ctx); err == nil {
				t.Fatal("the intruder registered")
			}
			intruder.Close()
			if !hasCode(errs.all(), codes.PermissionDenied) {
				t.Fatalf("the intruder's errors %v include no PERMISSION_DENIED", errs.all())
			}
			if after := instanceIDs(ep.srv.GetRegistry(), pluginName); fmt.Sprint(after) != fmt.Sprint(before) {
				t.Fatalf("instances %v, before %v", after, before)
			}
			cctx, ccancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer ccancel()
			if err := everyKind(cctx, testgrpc.NewTestServiceClient(ep.srv.GetRegistry().Plugin(pluginName))); err != nil {
				t.Fatalf("the plugin after the intrusion: %v", err)
			}
		})
	})
}

func hasCode(errs []error, code codes.Code) bool {
	for _, err := range errs {
		if status.Code(err) == code {
			return true
		}
	}
	return false
}

// load calls the plugin without pause from three goroutines, every kind of
// call, until ctx ends, as an operator would; calls wait for a connected
// instance (grpc.WaitForReady), as reconnections require.
type load struct {
	ok, failed atomic.Int64
	mu         sync.Mutex
	errs       []error
	instances  map[string]bool
}

func runLoad(ctx context.Context, reg *registry.Registry) *load {
	l := &load{instances: map[string]bool{}}
	c := testgrpc.NewTestServiceClient(reg.Plugin(pluginName))
	var wg sync.WaitGroup
	call := func(f func(context.Context) error) {
		for ctx.Err() == nil {
			cctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
			err := f(cctx)
			cancel()
			l.mu.Lock()
			if err != nil {
				l.failed.Add(1)
				l.errs = append(l.errs, err)
			} else {
				l.ok.Add(1)
			}
			for _, id := range instanceIDs(reg, pluginName) {
				l.instances[id] = true
			}
			l.mu.Unlock()
		}
	}
	wait := grpc.WaitForReady(true)
	wg.Go(func() { call(func(ctx context.Context) error { return everyKind(ctx, c, wait) }) })
	wg.Go(func() { call(func(ctx context.Context) error { return everyKind(ctx, c, wait) }) })
	wg.Go(func() {
		call(func(ctx context.Context) error {
			_, err := c.UnaryCall(ctx, &testgrpc.SimpleRequest{ResponseSize: 10}, wait)
			return err
		})
	})
	wg.Wait()
	return l
}

// kubelet writes a fresh token into file every period, as the kubelet
// rotates a projected token, until ctx ends; it returns the expiry of
// each token it wrote.
func kubelet(ctx context.Context, t *testing.T, c *cluster, file string, period time.Duration) func() map[[32]byte]time.Time {
	var mu sync.Mutex
	issued := map[[32]byte]time.Time{}
	write := func() {
		tok, exp, err := c.requestToken(pluginNS, pluginSA, c.audience)
		if err != nil {
			t.Error(err)
			return
		}
		mu.Lock()
		issued[sha256.Sum256([]byte(tok))] = exp
		mu.Unlock()
		if err := testpki.WriteFile(file, []byte(tok)); err != nil {
			t.Error(err)
		}
	}
	write()
	done := make(chan struct{})
	go func() {
		defer close(done)
		tick := time.NewTicker(period)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
				write()
			}
		}
	}()
	return func() map[[32]byte]time.Time {
		<-done
		mu.Lock()
		defer mu.Unlock()
		return issued
	}
}

// seenToken is a token a server accepted, and the expiry it read from it.
type seenToken struct {
	hash      [32]byte
	expiresAt time.Time
}

// recordTokens wraps an authenticator to record the tokens it accepts.
func recordTokens(authn server.Authenticator, mu *sync.Mutex, seen *[]seenToken) server.Authenticator {
	return func(ctx context.Context) (server.Identity, error) {
		id, err := authn(ctx)
		if err == nil {
			tok, _ := auth.BearerToken(ctx)
			mu.Lock()
			*seen = append(*seen, seenToken{sha256.Sum256([]byte(tok)), id.ExpiresAt})
			mu.Unlock()
		}
		return id, err
	}
}

// expiryDrainBuiltIn: with tokens of 600 s and an expiry margin of 597 s,
// every tunnel is drained about 3 s after it opened, because its token
// "expires soon"; the plugin reconnects each time with the token its file
// holds, which a fake kubelet replaces every second. Meanwhile the serving
// certificate and the CA are rotated. No call may fail.
func expiryDrainBuiltIn(t *testing.T, c *cluster) {
	kc := operatorClient(c)
	tokens, err := auth.NewTokenAuthenticator(kc.AuthenticationV1().TokenReviews(), auth.TokenAuthenticatorConfig{Audiences: []string{c.audience}})
	if err != nil {
		t.Fatal(err)
	}
	authz, err := auth.NewAuthorizer(kc.AuthorizationV1().SubjectAccessReviews(), auth.AuthorizerConfig{})
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var seen []seenToken
	p := newPKI(t, "operator-ca-1")
	firstCA, err := os.ReadFile(p.caFile)
	if err != nil {
		t.Fatal(err)
	}
	srv, addr, logs := runServer(t, "127.0.0.1:0",
		server.WithAuthenticator(auth.AuthorizeConnect(recordTokens(tokens.Authenticate, &mu, &seen), authz)),
		server.WithRegistrationPolicy(auth.RegistrationPolicy(authz, "")),
		server.WithTLS(p.certFile, p.keyFile),
		server.WithTokenExpiryMargin(tokenSeconds*time.Second-3*time.Second),
		// New TLS connections (and so the rotated certificate) at least
		// every 2 s; established tunnels finish on their connection.
		server.WithMaxConnectionAge(2*time.Second, time.Minute),
	)
	ep := &endpoint{srv: srv, target: addr, caFile: p.caFile, serverName: serverName, logs: logs}

	ctx, cancel := context.WithTimeout(context.Background(), 11*time.Second)
	defer cancel()
	tokenFile := filepath.Join(t.TempDir(), "token")
	issued := kubelet(ctx, t, c, tokenFile, time.Second)
	svc := newTestService()
	plugin := newPlugin(t, ep, pluginName, tokenFile, svc, logr.Discard())
	waitReady(t, plugin)

	// Rotate the certificate a few seconds in: first the new CA next to the
	// old one, then the new CA alone.
	rotated := make(chan struct{})
	go func() {
		defer close(rotated)
		time.Sleep(3 * time.Second)
		newCA, err := p.rotate("operator-ca-2", firstCA)
		if err != nil {
			t.Error(err)
			return
		}
		time.Sleep(2 * time.Second)
		if err := testpki.WriteFile(p.caFile, newCA); err != nil {
			t.Error(err)
		}
	}()
	l := runLoad(ctx, srv.GetRegistry())
	<-rotated
	expiries := issued()

	mu.Lock()
	defer mu.Unlock()
	distinct := map[[32]byte]bool{}
	for _, s := range seen {
		distinct[s.hash] = true
		if exp, ok := expiries[s.hash]; ok && !s.expiresAt.Equal(exp) {
			t.Errorf("the server read an expiry of %v from a token TokenRequest issued until %v", s.expiresAt, exp)
		}
	}
	drains := strings.Count(logs.String(), "credentials expire soon")
	t.Logf("%d calls, %d failed, %d instances, %d tunnels authenticated with %d distinct tokens, %d expiry drains, calls per CA %v",
		l.ok.Load()+l.failed.Load(), l.failed.Load(), len(l.instances), len(seen), len(distinct), drains, svc.issuerCounts())
	if l.failed.Load() > 0 {
		t.Errorf("%d calls failed, first: %v", l.failed.Load(), l.errs[0])
	}
	if len(l.instances) < 3 || len(distinct) < 3 || drains < 2 {
		t.Errorf("want at least 3 instances, 3 distinct tokens and 2 expiry drains")
	}
	if svc.issuerCounts()["operator-ca-2"] == 0 {
		t.Errorf("no call went through a connection with the rotated certificate")
	}
}

// maxAgeBehindProxy: kube-rbac-proxy does not forward the token, so the
// server bounds tunnels with a maximum age (3 s here); each reconnection
// goes through the proxy again with the token the file holds by then.
func maxAgeBehindProxy(t *testing.T, c *cluster) {
	ep := startBehindProxy(t, c, server.WithMaxTunnelAge(3*time.Second))
	ctx, cancel := context.WithTimeout(context.Background(), 9*time.Second)
	defer cancel()
	tokenFile := filepath.Join(t.TempDir(), "token")
	issued := kubelet(ctx, t, c, tokenFile, time.Second)
	errs := &errorLog{}
	plugin := newPlugin(t, ep, pluginName, tokenFile, newTestService(), errs.logger())
	waitReady(t, plugin)
	l := runLoad(ctx, ep.srv.GetRegistry())
	issued()
	drains := strings.Count(ep.logs.String(), "maximum age")
	t.Logf("%d calls, %d failed, %d instances, %d max-age drains", l.ok.Load()+l.failed.Load(), l.failed.Load(), len(l.instances), drains)
	if l.failed.Load() > 0 {
		t.Errorf("%d calls failed, first: %v", l.failed.Load(), l.errs[0])
	}
	if len(l.instances) < 3 || drains < 2 {
		t.Errorf("want at least 3 instances and 2 max-age drains")
	}

	// Each reconnection reads the file and is checked by the proxy: with a
	// bad token in the file, the next one is refused (UNAUTHENTICATED) and
	// the plugin leaves the registry once its tunnel has drained.
	if err := testpki.WriteFile(tokenFile, []byte("garbage")); err != nil {
		t.Fatal(err)
	}
	eventuallyTrue(t, 10*time.Second, "the plugin leaves the registry", func() bool {
		return len(instanceIDs(ep.srv.GetRegistry(), pluginName)) == 0
	})
	eventuallyTrue(t, 5*time.Second, "the plugin learns it is UNAUTHENTICATED", func() bool {
		return hasCode(errs.all(), codes.Unauthenticated)
	})
	tok, _ := c.token(t, pluginNS, pluginSA, c.audience)
	if err := testpki.WriteFile(tokenFile, []byte(tok)); err != nil {
		t.Fatal(err)
	}
	waitReady(t, plugin)
}

func eventuallyTrue(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out: %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// forgedIdentity: a process in the pod other than kube-rbac-proxy sends
// the identity headers straight to the server, from another loopback
// address (as a service mesh's sidecar does, 127.0.0.6) or from 127.0.0.1
// as another user; and a plugin sends them through the proxy, which
// overwrites them. None gets the plugin's name.
func forgedIdentity(t *testing.T, c *cluster, tk *tokens) {
	ep := startBehindProxy(t, c)
	forged := metadata.Pairs("x-remote-user", pluginUser, "x-remote-groups", "system:serviceaccounts|system:authenticated")
	before := refusedConnections(t)
	direct := []struct{ name, from string }{{"from 127.0.0.6", "127.0.0.6"}}
	if proxyUID(t) != server.AnyUID {
		direct = append(direct, struct{ name, from string }{"from 127.0.0.1, as another user than the proxy's", "127.0.0.1"})
	}
	for _, d := range direct {
		t.Run(d.name, func(t *testing.T) {
			r := rawConnectFrom(t, ep.upstream, d.from, insecure.NewCredentials(), forged, pluginName)
			if r.acked || r.final.Code() != codes.Unavailable {
				t.Fatalf("got %v, want the connection refused (UNAVAILABLE)", r)
			}
			t.Logf("%v: %s", r.final.Code(), r.final.Message())
		})
	}
	if got := refusedConnections(t) - before; got < float64(len(direct)) {
		t.Errorf("plugin_framework_server_connections_refused_total{reason=\"peer\"} rose by %v, want at least %d", got, len(direct))
	}
	creds := tlsCreds(t, ep.caFile, ep.serverName)
	t.Run("through the proxy without a token", func(t *testing.T) {
		r := rawConnectFrom(t, ep.target, "127.0.0.1", creds, forged, pluginName)
		if r.acked || r.final.Code() != codes.Unauthenticated {
			t.Fatalf("got %v, want UNAUTHENTICATED", r)
		}
	})
	t.Run("through the proxy with another ServiceAccount's token", func(t *testing.T) {
		md := metadata.Join(forged, metadata.Pairs("authorization", "Bearer "+tk.intruder))
		r := rawConnectFrom(t, ep.target, "127.0.0.1", creds, md, pluginName)
		if r.acked || r.reject.Code() != codes.PermissionDenied {
			t.Fatalf("got %v, want a PERMISSION_DENIED RegisterReject: the proxy must have replaced the forged identity", r)
		}
		t.Logf("%s", r.reject.Message())
	})
	// The proxy itself still gets through.
	p := newPlugin(t, ep, pluginName, tk.goodFile, newTestService(), logr.Discard())
	waitReady(t, p)
}

// refusedConnections reads plugin_framework_server_connections_refused_total{reason="peer"}.
func refusedConnections(t *testing.T) float64 {
	t.Helper()
	mfs, err := metrics.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "plugin_framework_server_connections_refused_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "reason" && l.GetValue() == "peer" {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	return 0
}

// deletedServiceAccount: a plugin's ServiceAccount is deleted while its
// tunnel is open; the server, which reviews the tunnel's token again
// (caches of 1 s, revalidation every 500 ms here), drains it, and the
// plugin cannot register again.
func deletedServiceAccount(t *testing.T, c *cluster) {
	ctx := t.Context()
	const sa, name = "doomed", "doomed-plugin"
	c.create(t, ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa, Namespace: pluginNS}})
	c.create(t, ctx, &rbacv1.ClusterRole{
		ObjectMeta: metav1.ObjectMeta{Name: "e2e-register-" + name},
		Rules:      []rbacv1.PolicyRule{{APIGroups: []string{auth.PluginsGroup}, Resources: []string{auth.PluginsResource}, ResourceNames: []string{name}, Verbs: []string{auth.RegisterVerb}}},
	})
	for binding, role := range map[string]string{"e2e-doomed-connect": "opf-plugin-connect", "e2e-doomed-register": "e2e-register-" + name} {
		c.create(t, ctx, &rbacv1.ClusterRoleBinding{
			ObjectMeta: metav1.ObjectMeta{Name: binding},
			RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: role},
			Subjects:   []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Name: sa, Namespace: pluginNS}},
		})
	}
	user := "system:serviceaccount:" + pluginNS + ":" + sa
	c.waitAllowed(t, ctx, user, authzv1.SubjectAccessReviewSpec{ResourceAttributes: &authzv1.ResourceAttributes{
		Group: auth.PluginsGroup, Resource: auth.PluginsResource, Verb: auth.RegisterVerb, Name: name,
	}})

	kc := operatorClient(c)
	tokens, err := auth.NewTokenAuthenticator(kc.AuthenticationV1().TokenReviews(), auth.TokenAuthenticatorConfig{Audiences: []string{c.audience}, CacheTTL: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	authz, err := auth.NewAuthorizer(kc.AuthorizationV1().SubjectAccessReviews(), auth.AuthorizerConfig{AllowCacheTTL: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	p := newPKI(t, "operator-ca-doomed")
	srv, addr, logs := runServer(t, "127.0.0.1:0",
		server.WithAuthenticator(auth.AuthorizeConnect(tokens.Authenticate, authz)),
		server.WithRegistrationPolicy(auth.RegistrationPolicy(authz, "")),
		server.WithTLS(p.certFile, p.keyFile),
		server.WithRevalidationInterval(500*time.Millisecond))
	ep := &endpoint{srv: srv, target: addr, caFile: p.caFile, serverName: serverName, logs: logs}

	tok, _ := c.token(t, pluginNS, sa, c.audience)
	tokenFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokenFile, []byte(tok), 0o600); err != nil {
		t.Fatal(err)
	}
	errs := &errorLog{}
	plugin := newPlugin(t, ep, name, tokenFile, newTestService(), errs.logger())
	waitReady(t, plugin)
	// Calls work, and keep working while the tunnel is revalidated.
	time.Sleep(1500 * time.Millisecond)
	cctx, ccancel := context.WithTimeout(ctx, 10*time.Second)
	defer ccancel()
	if _, err := testgrpc.NewTestServiceClient(srv.GetRegistry().Plugin(name)).EmptyCall(cctx, &testgrpc.Empty{}); err != nil {
		t.Fatalf("call before the deletion: %v", err)
	}

	if err := c.cs.CoreV1().ServiceAccounts(pluginNS).Delete(ctx, sa, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	deleted := time.Now()
	eventuallyTrue(t, 15*time.Second, "the deleted ServiceAccount's tunnel leaves the registry", func() bool {
		return len(instanceIDs(srv.GetRegistry(), name)) == 0
	})
	t.Logf("drained %s after the deletion", time.Since(deleted).Round(time.Millisecond))
	if !strings.Contains(logs.String(), "credentials no longer accepted") {
		t.Errorf("the server did not log why it drained the tunnel")
	}
	eventuallyTrue(t, 5*time.Second, "the plugin learns it is UNAUTHENTICATED", func() bool {
		return hasCode(errs.all(), codes.Unauthenticated)
	})
	time.Sleep(time.Second)
	if n := len(instanceIDs(srv.GetRegistry(), name)); n != 0 {
		t.Fatalf("the plugin registered again (%d instances) without a ServiceAccount", n)
	}
}
