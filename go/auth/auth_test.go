package auth

import (
	"context"
	"encoding/base64"
	"errors"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	authnv1 "k8s.io/api/authentication/v1"
	authzv1 "k8s.io/api/authorization/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/guilhem/operator-plugin-framework/go/server"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// jwt makes an unsigned JWT-shaped token with these claims.
func jwt(claims string) string {
	enc := base64.RawURLEncoding.EncodeToString
	return enc([]byte(`{"alg":"RS256"}`)) + "." + enc([]byte(claims)) + ".c2ln"
}

// tok is a JWT-shaped token for the audience "aud" that passes the
// structural check (it expires after the fake clock's start), told apart
// by name.
func tok(name string) string {
	return jwt(`{"aud":["aud"],"exp":1900000000,"sub":"` + name + `"}`)
}

// fakeClock is a settable clock.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *fakeClock) add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// fakeTokenReviews answers TokenReviews from a table of valid tokens.
type fakeTokenReviews struct {
	mu     sync.Mutex
	calls  int
	specs  []authnv1.TokenReviewSpec
	valid  map[string]authnv1.TokenReviewStatus
	failed error
}

func (f *fakeTokenReviews) Create(_ context.Context, r *authnv1.TokenReview, _ metav1.CreateOptions) (*authnv1.TokenReview, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	f.specs = append(f.specs, r.Spec)
	if f.failed != nil {
		return nil, f.failed
	}
	out := r.DeepCopy()
	if st, ok := f.valid[r.Spec.Token]; ok {
		out.Status = st
	} else {
		out.Status = authnv1.TokenReviewStatus{Error: "token is invalid"}
	}
	return out, nil
}

func (f *fakeTokenReviews) count() int { f.mu.Lock(); defer f.mu.Unlock(); return f.calls }

// withToken is a Connect call's context from a remote peer over TLS.
func withToken(token string) context.Context {
	ctx := peer.NewContext(context.Background(), &peer.Peer{Addr: &net.TCPAddr{IP: net.IPv4(10, 0, 0, 1), Port: 1}, AuthInfo: credentials.TLSInfo{}})
	if token == "" {
		return ctx
	}
	return metadata.NewIncomingContext(ctx, metadata.Pairs("authorization", "Bearer "+token))
}

func wantCode(t *testing.T, err error, code codes.Code) {
	t.Helper()
	if got := status.Code(err); got != code {
		t.Fatalf("got %v (%v), want %v", got, err, code)
	}
}

func TestBearerToken(t *testing.T) {
	for _, c := range []struct {
		name string
		md   metadata.MD
		want string
		code codes.Code
	}{
		{"none", nil, "", codes.Unauthenticated},
		{"bearer", metadata.Pairs("authorization", "Bearer abc"), "abc", codes.OK},
		{"scheme case", metadata.Pairs("authorization", "bearer abc"), "abc", codes.OK},
		{"basic", metadata.Pairs("authorization", "Basic abc"), "", codes.Unauthenticated},
		{"empty token", metadata.Pairs("authorization", "Bearer "), "", codes.Unauthenticated},
		{"two", metadata.Pairs("authorization", "Bearer a", "authorization", "Bearer b"), "", codes.Unauthenticated},
	} {
		t.Run(c.name, func(t *testing.T) {
			ctx := context.Background()
			if c.md != nil {
				ctx = metadata.NewIncomingContext(ctx, c.md)
			}
			got, err := BearerToken(ctx)
			wantCode(t, err, c.code)
			if got != c.want {
				t.Fatalf("token %q, want %q", got, c.want)
			}
		})
	}
}

func TestTokenExpiry(t *testing.T) {
	exp, ok := TokenExpiry(jwt(`{"exp":1900000000,"sub":"x"}`))
	if !ok || !exp.Equal(time.Unix(1900000000, 0)) {
		t.Fatalf("got %v %v", exp, ok)
	}
	if exp, ok := TokenExpiry(jwt(`{"exp":1900000000.5}`)); !ok || !exp.Equal(time.Unix(1900000000, 5e8)) {
		t.Fatalf("fractional exp: got %v %v", exp, ok)
	}
	for _, tok := range []string{"", "garbage", "a.b", "a.!!!.c", jwt(`{"sub":"x"}`), jwt(`{"exp":"soon"}`), jwt(`{"exp":-1}`), jwt(`not json`)} {
		if _, ok := TokenExpiry(tok); ok {
			t.Errorf("TokenExpiry(%q) ok, want not", tok)
		}
	}
}

func newTestTokenAuth(t *testing.T, f TokenReviewer, cfg TokenAuthenticatorConfig) (*TokenAuthenticator, *fakeClock) {
	t.Helper()
	if cfg.Audiences == nil {
		cfg.Audiences = []string{"aud"}
	}
	a, err := NewTokenAuthenticator(f, cfg)
	if err != nil {
		t.Fatal(err)
	}
	clock := &fakeClock{t: time.Unix(1_800_000_000, 0)}
	a.now = clock.now
	return a, clock
}

func TestTokenAuthenticator(t *testing.T) {
	good := jwt(`{"aud":"aud","exp":1800000600}`)
	f := &fakeTokenReviews{valid: map[string]authnv1.TokenReviewStatus{
		good: {Authenticated: true, Audiences: []string{"aud"}, User: authnv1.UserInfo{
			Username: "system:serviceaccount:ns:sa", UID: "uid-1", Groups: []string{"system:serviceaccounts"},
			Extra: map[string]authnv1.ExtraValue{"authentication.kubernetes.io/pod-name": {"p"}},
		}},
		tok("other-audience"): {Authenticated: true, Audiences: []string{"api"}, User: authnv1.UserInfo{Username: "u"}},
		tok("no-audiences"):   {Authenticated: true, User: authnv1.UserInfo{Username: "u"}},
	}}
	a, clock := newTestTokenAuth(t, f, TokenAuthenticatorConfig{})

	id, err := a.Authenticate(withToken(good))
	if err != nil {
		t.Fatal(err)
	}
	if id.User != "system:serviceaccount:ns:sa" || id.UID != "uid-1" || !slices.Equal(id.Groups, []string{"system:serviceaccounts"}) ||
		id.Extra["authentication.kubernetes.io/pod-name"][0] != "p" || id.Peer == nil {
		t.Fatalf("identity %+v", id)
	}
	if !id.ExpiresAt.Equal(time.Unix(1_800_000_600, 0)) {
		t.Fatalf("ExpiresAt %v", id.ExpiresAt)
	}
	if got := f.specs[0].Audiences; !slices.Equal(got, []string{"aud"}) {
		t.Fatalf("review audiences %v", got)
	}

	// Cached: no second review.
	if _, err := a.Authenticate(withToken(good)); err != nil || f.count() != 1 {
		t.Fatalf("second authentication: %v, %d reviews", err, f.count())
	}
	// The cache entry expires after its TTL.
	clock.add(defaultTokenCacheTTL)
	if _, err := a.Authenticate(withToken(good)); err != nil || f.count() != 2 {
		t.Fatalf("after TTL: %v, %d reviews", err, f.count())
	}

	for _, c := range []struct{ name, token string }{
		{"no token", ""},
		{"garbage", tok("garbage")},
		{"audience not ours", tok("other-audience")},
		{"no audience in review", tok("no-audiences")},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := a.Authenticate(withToken(c.token))
			wantCode(t, err, codes.Unauthenticated)
		})
	}

	// A refusal is cached for FailureCacheTTL.
	n := f.count()
	_, err = a.Authenticate(withToken(tok("garbage")))
	wantCode(t, err, codes.Unauthenticated)
	if f.count() != n {
		t.Fatalf("refusal not cached")
	}
	clock.add(defaultTokenFailureTTL)
	_, _ = a.Authenticate(withToken(tok("garbage")))
	if f.count() != n+1 {
		t.Fatalf("refusal cached past its TTL")
	}
}

func TestTokenCacheNeverOutlivesToken(t *testing.T) {
	tok := jwt(`{"aud":"aud","exp":1800000010}`) // 10 s after the fake clock's start
	f := &fakeTokenReviews{valid: map[string]authnv1.TokenReviewStatus{
		tok: {Authenticated: true, Audiences: []string{"aud"}, User: authnv1.UserInfo{Username: "u"}},
	}}
	a, clock := newTestTokenAuth(t, f, TokenAuthenticatorConfig{})
	if _, err := a.AuthenticateToken(context.Background(), tok); err != nil {
		t.Fatal(err)
	}
	clock.add(10 * time.Second)
	// The API server now refuses the expired token.
	f.mu.Lock()
	delete(f.valid, tok)
	f.mu.Unlock()
	_, err := a.AuthenticateToken(context.Background(), tok)
	wantCode(t, err, codes.Unauthenticated)
	if f.count() != 2 {
		t.Fatalf("%d reviews, want 2: the cache served an expired token", f.count())
	}
}

func TestTokenReviewFailureIsUnavailableAndNotCached(t *testing.T) {
	f := &fakeTokenReviews{failed: errors.New("connection refused")}
	a, _ := newTestTokenAuth(t, f, TokenAuthenticatorConfig{})
	for range 2 {
		_, err := a.Authenticate(withToken(tok("x")))
		wantCode(t, err, codes.Unavailable)
	}
	if f.count() != 2 {
		t.Fatalf("%d reviews, want 2", f.count())
	}
}

func TestTokenAuthenticatorNoCache(t *testing.T) {
	f := &fakeTokenReviews{valid: map[string]authnv1.TokenReviewStatus{
		tok("t"): {Authenticated: true, Audiences: []string{"aud"}, User: authnv1.UserInfo{Username: "u"}},
	}}
	a, _ := newTestTokenAuth(t, f, TokenAuthenticatorConfig{CacheTTL: -1, FailureCacheTTL: -1})
	for range 3 {
		if _, err := a.AuthenticateToken(context.Background(), tok("t")); err != nil {
			t.Fatal(err)
		}
		_, _ = a.AuthenticateToken(context.Background(), tok("bad"))
	}
	if f.count() != 6 {
		t.Fatalf("%d reviews, want 6", f.count())
	}
}

func TestNewTokenAuthenticatorNeedsAudiences(t *testing.T) {
	if _, err := NewTokenAuthenticator(&fakeTokenReviews{}, TokenAuthenticatorConfig{Audiences: []string{""}}); err == nil {
		t.Fatal("no error without audiences")
	}
	if _, err := NewTokenAuthenticator(nil, TokenAuthenticatorConfig{Audiences: []string{"a"}}); err == nil {
		t.Fatal("no error without a client")
	}
}

func TestCacheIsBounded(t *testing.T) {
	clock := &fakeClock{t: time.Unix(0, 0)}
	c := newCache[string, int](2, clock.now)
	c.put("a", 1, clock.now().Add(time.Minute))
	c.put("b", 2, clock.now().Add(2*time.Minute))
	c.put("c", 3, clock.now().Add(3*time.Minute))
	if c.len() != 2 {
		t.Fatalf("len %d", c.len())
	}
	if _, ok := c.get("a"); ok {
		t.Fatal("the entry closest to expiry was not evicted")
	}
	if v, ok := c.get("c"); !ok || v != 3 {
		t.Fatal("newest entry missing")
	}
	clock.add(2 * time.Minute)
	c.put("d", 4, clock.now().Add(time.Minute)) // b expired: it goes first
	if _, ok := c.get("c"); !ok {
		t.Fatal("live entry evicted while an expired one was there")
	}
	c.put("e", 5, clock.now()) // already expired: not stored
	if _, ok := c.get("e"); ok {
		t.Fatal("expired entry stored")
	}
	none := newCache[string, int](0, clock.now)
	none.put("x", 1, clock.now().Add(time.Hour))
	if none.len() != 0 {
		t.Fatal("a cache of size 0 stored an entry")
	}
}

// fakeSAR allows what allow says.
type fakeSAR struct {
	mu     sync.Mutex
	specs  []authzv1.SubjectAccessReviewSpec
	allow  func(authzv1.SubjectAccessReviewSpec) bool
	failed error
}

func (f *fakeSAR) Create(_ context.Context, r *authzv1.SubjectAccessReview, _ metav1.CreateOptions) (*authzv1.SubjectAccessReview, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.specs = append(f.specs, r.Spec)
	if f.failed != nil {
		return nil, f.failed
	}
	out := r.DeepCopy()
	out.Status.Allowed = f.allow(r.Spec)
	if !out.Status.Allowed {
		out.Status.Reason = "no RBAC rule"
	}
	return out, nil
}

func (f *fakeSAR) count() int { f.mu.Lock(); defer f.mu.Unlock(); return len(f.specs) }

func newTestAuthorizer(t *testing.T, f *fakeSAR) (*Authorizer, *fakeClock) {
	t.Helper()
	a, err := NewAuthorizer(f, AuthorizerConfig{})
	if err != nil {
		t.Fatal(err)
	}
	clock := &fakeClock{t: time.Unix(1_800_000_000, 0)}
	a.now = clock.now
	return a, clock
}

func TestAuthorizerCaches(t *testing.T) {
	f := &fakeSAR{allow: func(s authzv1.SubjectAccessReviewSpec) bool { return s.User == "alice" }}
	a, clock := newTestAuthorizer(t, f)
	attrs := Attributes{NonResource: &authzv1.NonResourceAttributes{Path: "/p", Verb: "create"}}
	alice := server.Identity{User: "alice", Groups: []string{"b", "a"}, Extra: map[string][]string{"k": {"v"}}}
	d, err := a.Authorize(context.Background(), alice, attrs)
	if err != nil || !d.Allowed {
		t.Fatalf("alice: %+v %v", d, err)
	}
	if s := f.specs[0]; s.UID != "" || !slices.Equal(s.Groups, []string{"a", "b"}) || s.Extra["k"][0] != "v" || s.NonResourceAttributes.Path != "/p" {
		t.Fatalf("spec %+v", s)
	}
	// Same identity, groups in another order: cached.
	alice.Groups = []string{"a", "b"}
	if d, _ := a.Authorize(context.Background(), alice, attrs); !d.Allowed || f.count() != 1 {
		t.Fatalf("not cached: %d reviews", f.count())
	}
	d, err = a.Authorize(context.Background(), server.Identity{User: "bob"}, attrs)
	if err != nil || d.Allowed || d.Reason != "no RBAC rule" {
		t.Fatalf("bob: %+v %v", d, err)
	}
	_, _ = a.Authorize(context.Background(), server.Identity{User: "bob"}, attrs)
	if f.count() != 2 {
		t.Fatalf("denial not cached: %d reviews", f.count())
	}
	clock.add(defaultDenyTTL)
	_, _ = a.Authorize(context.Background(), server.Identity{User: "bob"}, attrs)
	if f.count() != 3 {
		t.Fatalf("denial cached past its TTL: %d reviews", f.count())
	}
	if _, err := a.Authorize(context.Background(), alice, Attributes{}); status.Code(err) != codes.Internal {
		t.Fatalf("no attributes: %v", err)
	}
}

func TestAuthorizerFailure(t *testing.T) {
	f := &fakeSAR{failed: errors.New("boom")}
	a, _ := newTestAuthorizer(t, f)
	_, err := a.Authorize(context.Background(), server.Identity{User: "u"}, Attributes{NonResource: &authzv1.NonResourceAttributes{Path: "/", Verb: "get"}})
	wantCode(t, err, codes.Unavailable)
}

func TestAuthorizeConnect(t *testing.T) {
	f := &fakeSAR{allow: func(s authzv1.SubjectAccessReviewSpec) bool {
		return s.User == "ok" && s.NonResourceAttributes != nil && s.NonResourceAttributes.Path == ConnectPath && s.NonResourceAttributes.Verb == "create"
	}}
	authz, _ := newTestAuthorizer(t, f)
	as := func(user string, err error) server.Authenticator {
		return func(context.Context) (server.Identity, error) { return server.Identity{User: user}, err }
	}
	if id, err := AuthorizeConnect(as("ok", nil), authz)(context.Background()); err != nil || id.User != "ok" {
		t.Fatalf("allowed: %v %v", id, err)
	}
	_, err := AuthorizeConnect(as("nope", nil), authz)(context.Background())
	wantCode(t, err, codes.PermissionDenied)
	_, err = AuthorizeConnect(as("", status.Error(codes.Unauthenticated, "x")), authz)(context.Background())
	wantCode(t, err, codes.Unauthenticated)
}

func TestRegistrationPolicy(t *testing.T) {
	f := &fakeSAR{allow: func(s authzv1.SubjectAccessReviewSpec) bool {
		r := s.ResourceAttributes
		return r != nil && s.User == "sa" && r.Group == PluginsGroup && r.Resource == "plugins" && r.Verb == "register" && r.Name == "mine" && r.Namespace == "ops"
	}}
	authz, _ := newTestAuthorizer(t, f)
	p := RegistrationPolicy(authz, "ops")
	if err := p(context.Background(), server.Identity{User: "sa"}, server.Registration{Name: "mine"}); err != nil {
		t.Fatal(err)
	}
	err := p(context.Background(), server.Identity{User: "sa"}, server.Registration{Name: "theirs"})
	wantCode(t, err, codes.PermissionDenied)
	if !strings.Contains(err.Error(), `"theirs"`) {
		t.Fatalf("message does not name the plugin: %v", err)
	}
	wantCode(t, p(context.Background(), server.Identity{}, server.Registration{Name: "mine"}), codes.PermissionDenied)
}

func TestStaticPolicy(t *testing.T) {
	p := StaticPolicy(map[string][]string{"a": {"x", "y"}, "admin": {"*"}})
	for _, c := range []struct {
		user, name string
		ok         bool
	}{
		{"a", "x", true}, {"a", "y", true}, {"a", "z", false},
		{"admin", "anything", true}, {"b", "x", false}, {"", "x", false},
	} {
		err := p(context.Background(), server.Identity{User: c.user}, server.Registration{Name: c.name})
		if (err == nil) != c.ok {
			t.Errorf("%s registers %s: %v, want ok=%v", c.user, c.name, err, c.ok)
		}
		if err != nil {
			wantCode(t, err, codes.PermissionDenied)
		}
	}
}

func TestProxyHeaders(t *testing.T) {
	authn := ProxyHeaders(ProxyHeadersConfig{})
	ctx := func(addr net.Addr, kv ...string) context.Context {
		c := context.Background()
		if addr != nil {
			local := addr
			if tcp, ok := addr.(*net.TCPAddr); ok {
				local = &net.TCPAddr{IP: tcp.IP, Port: 9090} // the server's side: same address
			}
			c = peer.NewContext(c, &peer.Peer{Addr: addr, LocalAddr: local})
		}
		return metadata.NewIncomingContext(c, metadata.Pairs(kv...))
	}
	lo := &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 5000}
	lo6 := &net.TCPAddr{IP: net.IPv6loopback, Port: 5000}
	id, err := authn(ctx(lo, "x-remote-user", "system:serviceaccount:a:b", "x-remote-groups", "g1|g2|"))
	if err != nil || id.User != "system:serviceaccount:a:b" || !slices.Equal(id.Groups, []string{"g1", "g2"}) {
		t.Fatalf("%+v %v", id, err)
	}
	if _, err := authn(ctx(lo6, "x-remote-user", "u")); err != nil {
		t.Fatalf("IPv6 loopback: %v", err)
	}
	for name, c := range map[string]context.Context{
		"remote peer": ctx(&net.TCPAddr{IP: net.IPv4(10, 1, 2, 3), Port: 1}, "x-remote-user", "admin"),
		"another loopback address": peer.NewContext(metadata.NewIncomingContext(context.Background(), metadata.Pairs("x-remote-user", "admin")),
			&peer.Peer{Addr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 6), Port: 1}, LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 9090}}),
		"unix peer":    ctx(&net.UnixAddr{Name: "/s", Net: "unix"}, "x-remote-user", "admin"),
		"no peer":      ctx(nil, "x-remote-user", "admin"),
		"no header":    ctx(lo),
		"empty header": ctx(lo, "x-remote-user", ""),
		"two users":    ctx(lo, "x-remote-user", "a", "x-remote-user", "b"),
	} {
		t.Run(name, func(t *testing.T) {
			_, err := authn(c)
			wantCode(t, err, codes.Unauthenticated)
		})
	}
	custom := ProxyHeaders(ProxyHeadersConfig{UserHeader: "X-User", GroupsHeader: "X-Groups", GroupSeparator: ","})
	if id, err := custom(ctx(lo, "x-user", "u", "x-groups", "a,b")); err != nil || !slices.Equal(id.Groups, []string{"a", "b"}) {
		t.Fatalf("custom headers: %+v %v", id, err)
	}
}
