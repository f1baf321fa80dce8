package auth

import (
	"context"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	authnv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// blockingReviews holds every TokenReview until release is closed (or the
// review's context ends), counting them.
type blockingReviews struct {
	mu      sync.Mutex
	calls   int
	started chan struct{}
	release chan struct{}
	ctxErr  error // of the last review that ended with its context
}

func newBlockingReviews() *blockingReviews {
	return &blockingReviews{started: make(chan struct{}, 1000), release: make(chan struct{})}
}

func (b *blockingReviews) Create(ctx context.Context, r *authnv1.TokenReview, _ metav1.CreateOptions) (*authnv1.TokenReview, error) {
	b.mu.Lock()
	b.calls++
	b.mu.Unlock()
	b.started <- struct{}{}
	select {
	case <-b.release:
	case <-ctx.Done():
		b.mu.Lock()
		b.ctxErr = ctx.Err()
		b.mu.Unlock()
		return nil, ctx.Err()
	}
	out := r.DeepCopy()
	out.Status = authnv1.TokenReviewStatus{Error: "token is invalid"}
	return out, nil
}

func (b *blockingReviews) count() int { b.mu.Lock(); defer b.mu.Unlock(); return b.calls }

func TestStructuralCheckSpendsNoReview(t *testing.T) {
	f := &fakeTokenReviews{}
	a, _ := newTestTokenAuth(t, f, TokenAuthenticatorConfig{})
	for name, token := range map[string]string{
		"opaque":           "garbage",
		"two parts":        "a.b",
		"no signature":     strings.TrimSuffix(tok("x"), "c2ln"),
		"header not JSON":  "bm90.e30.c2ln",
		"another audience": jwt(`{"aud":["api"],"exp":1900000000}`),
		"no audience":      jwt(`{"exp":1900000000}`),
		"expired":          jwt(`{"aud":"aud","exp":1700000000}`),
		"too large":        tok(strings.Repeat("x", maxTokenSize)),
	} {
		t.Run(name, func(t *testing.T) {
			_, err := a.AuthenticateToken(context.Background(), token)
			wantCode(t, err, codes.Unauthenticated)
		})
	}
	if f.count() != 0 {
		t.Fatalf("%d reviews for tokens that could not pass one", f.count())
	}
	// The same token, shaped right, is reviewed.
	_, _ = a.AuthenticateToken(context.Background(), tok("x"))
	if f.count() != 1 {
		t.Fatalf("%d reviews of a well-shaped token, want 1", f.count())
	}
	// AllowNonJWT sends opaque tokens to the review.
	b, _ := newTestTokenAuth(t, f, TokenAuthenticatorConfig{AllowNonJWT: true})
	_, _ = b.AuthenticateToken(context.Background(), "opaque")
	if f.count() != 2 {
		t.Fatalf("AllowNonJWT: %d reviews, want 2", f.count())
	}
}

func TestConcurrentReviewsOfOneTokenAreOne(t *testing.T) {
	b := newBlockingReviews()
	a, _ := newTestTokenAuth(t, b, TokenAuthenticatorConfig{})
	var wg sync.WaitGroup
	for range 200 {
		wg.Go(func() {
			_, err := a.AuthenticateToken(context.Background(), tok("same"))
			if err == nil {
				t.Error("a bad token was accepted")
			}
		})
	}
	<-b.started
	time.Sleep(50 * time.Millisecond) // let the others join the review under way
	close(b.release)
	wg.Wait()
	if n := b.count(); n != 1 {
		t.Fatalf("%d reviews for 200 concurrent tunnels with one token, want 1", n)
	}
}

func TestReviewsInFlightAreCapped(t *testing.T) {
	b := newBlockingReviews()
	a, _ := newTestTokenAuth(t, b, TokenAuthenticatorConfig{Limits: ReviewLimits{MaxInFlight: 2}})
	var wg sync.WaitGroup
	for i := range 2 {
		wg.Go(func() { _, _ = a.AuthenticateToken(context.Background(), tok(string(rune('a'+i)))) })
	}
	<-b.started
	<-b.started
	start := time.Now()
	_, err := a.AuthenticateToken(context.Background(), tok("third"))
	wantCode(t, err, codes.Unavailable)
	if d := time.Since(start); d > time.Second {
		t.Fatalf("the refusal took %v: it should not wait", d)
	}
	close(b.release)
	wg.Wait()
	if b.count() != 2 {
		t.Fatalf("%d reviews, want 2", b.count())
	}
	// Not cached: once there is room, the third token is reviewed.
	_, _ = a.AuthenticateToken(context.Background(), tok("third"))
	if b.count() != 3 {
		t.Fatalf("%d reviews after the cap, want 3", b.count())
	}
}

func TestReviewRateLimit(t *testing.T) {
	f := &fakeTokenReviews{}
	a, _ := newTestTokenAuth(t, f, TokenAuthenticatorConfig{Limits: ReviewLimits{Rate: 0.001, Burst: 3}})
	var limited int
	for i := range 10 {
		_, err := a.AuthenticateToken(context.Background(), tok(string(rune('a'+i))))
		if err != nil && strings.Contains(err.Error(), "rate limit") {
			wantCode(t, err, codes.Unavailable)
			limited++
		}
	}
	if f.count() != 3 || limited != 7 {
		t.Fatalf("%d reviews and %d refused by the rate limit, want 3 and 7", f.count(), limited)
	}
	// Cached answers cost nothing.
	_, _ = a.AuthenticateToken(context.Background(), tok("a"))
	if f.count() != 3 {
		t.Fatalf("a cached refusal made a review")
	}
}

func TestReviewDeadline(t *testing.T) {
	b := newBlockingReviews()
	a, _ := newTestTokenAuth(t, b, TokenAuthenticatorConfig{Limits: ReviewLimits{Timeout: 100 * time.Millisecond}})
	start := time.Now()
	_, err := a.AuthenticateToken(context.Background(), tok("slow"))
	wantCode(t, err, codes.Unavailable)
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("the review took %v despite its 100 ms deadline", d)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.ctxErr != context.DeadlineExceeded {
		t.Fatalf("the review's context ended with %v, want its deadline", b.ctxErr)
	}
}

func TestCallerGivingUpDoesNotFailOthers(t *testing.T) {
	b := newBlockingReviews()
	a, _ := newTestTokenAuth(t, b, TokenAuthenticatorConfig{})
	ctx, cancel := context.WithCancel(context.Background())
	first := make(chan error, 1)
	go func() { _, err := a.AuthenticateToken(ctx, tok("shared")); first <- err }()
	<-b.started
	second := make(chan error, 1)
	go func() { _, err := a.AuthenticateToken(context.Background(), tok("shared")); second <- err }()
	time.Sleep(50 * time.Millisecond)
	cancel()
	wantCode(t, <-first, codes.Canceled)
	close(b.release)
	// The second caller gets the API server's answer, not the first's
	// cancellation.
	wantCode(t, <-second, codes.Unauthenticated)
}

func TestBearerTokenInClear(t *testing.T) {
	f := &fakeTokenReviews{valid: map[string]authnv1.TokenReviewStatus{
		tok("ok"): {Authenticated: true, Audiences: []string{"aud"}, User: authnv1.UserInfo{Username: "u"}},
	}}
	a, _ := newTestTokenAuth(t, f, TokenAuthenticatorConfig{})
	at := func(addr net.Addr) context.Context {
		ctx := peer.NewContext(context.Background(), &peer.Peer{Addr: addr})
		return metadata.NewIncomingContext(ctx, metadata.Pairs("authorization", "Bearer "+tok("ok")))
	}
	_, err := a.Authenticate(at(&net.TCPAddr{IP: net.IPv4(10, 0, 0, 1), Port: 1}))
	wantCode(t, err, codes.Unauthenticated)
	if f.count() != 0 {
		t.Fatal("a token sent in clear was reviewed")
	}
	for _, local := range []net.Addr{&net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 1}, &net.UnixAddr{Name: "@", Net: "unix"}} {
		if _, err := a.Authenticate(at(local)); err != nil {
			t.Fatalf("%v: %v", local, err)
		}
	}
}

func TestOnePeerCannotSpendEveryonesReviews(t *testing.T) {
	f := &fakeTokenReviews{}
	a, _ := newTestTokenAuth(t, f, TokenAuthenticatorConfig{Limits: ReviewLimits{PeerRate: 0.001, PeerBurst: 5}})
	from := func(ip string, token string) context.Context {
		ctx := peer.NewContext(context.Background(), &peer.Peer{Addr: &net.TCPAddr{IP: net.ParseIP(ip), Port: 1}, AuthInfo: credentials.TLSInfo{}})
		return metadata.NewIncomingContext(ctx, metadata.Pairs("authorization", "Bearer "+token))
	}
	var limited int
	for i := range 50 {
		_, err := a.Authenticate(from("10.0.0.66", tok(fmt.Sprint("attack", i))))
		if err != nil && strings.Contains(err.Error(), "for this peer") {
			wantCode(t, err, codes.Unavailable)
			limited++
		}
	}
	if f.count() != 5 || limited != 45 {
		t.Fatalf("%d reviews and %d refusals for one peer, want 5 and 45", f.count(), limited)
	}
	_, _ = a.Authenticate(from("10.0.0.7", tok("legit")))
	if f.count() != 6 {
		t.Fatalf("another peer's token was not reviewed")
	}
}
