package auth

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"math"
	"net"
	"slices"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	authnv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/guilhem/operator-plugin-framework/go/server"
)

// TokenReviewer creates TokenReviews. client-go's
// kubernetes.Interface.AuthenticationV1().TokenReviews() is one.
type TokenReviewer interface {
	Create(ctx context.Context, review *authnv1.TokenReview, opts metav1.CreateOptions) (*authnv1.TokenReview, error)
}

// TokenAuthenticatorConfig configures a TokenAuthenticator.
type TokenAuthenticatorConfig struct {
	// Audiences are what the token must have been issued for (at least one
	// of them), the projected token's "audience". Required: a token of the
	// API server's own audience (a pod's default token) must not open a
	// tunnel, or anyone who obtains it could replay it here.
	Audiences []string
	// CacheTTL is how long an accepted token's review is reused, never past
	// the token's expiry. Default 1 minute; negative disables the cache.
	CacheTTL time.Duration
	// FailureCacheTTL is how long a refused token stays refused without
	// asking the API server again. Default 10 s; negative disables it.
	FailureCacheTTL time.Duration
	// CacheSize bounds the number of reviews kept. Default 1024.
	CacheSize int
	// Limits bound the TokenReviews sent to the API server.
	Limits ReviewLimits
	// AllowNonJWT lets tokens that are not JSON Web Tokens reach the
	// TokenReview (a cluster with a webhook token authenticator, say).
	// By default a token must be a JWT whose claims name one of Audiences
	// and, when they have one, an expiry in the future: anything else is
	// refused without asking the API server, which is what keeps random
	// tokens from costing it anything. Tunnels opened with a non-JWT token
	// carry no expiry: they are bounded by their revalidation and maximum
	// age (server.WithRevalidationInterval, server.WithMaxTunnelAge).
	AllowNonJWT bool
}

const (
	defaultTokenCacheTTL   = time.Minute
	defaultTokenFailureTTL = 10 * time.Second
	defaultCacheSize       = 1024
	// maxTokenSize: a projected ServiceAccount token is 1-2 KiB.
	maxTokenSize = 8 << 10
	// clockSkew is allowed between this host and the token's issuer.
	clockSkew = time.Minute
)

// TokenAuthenticator authenticates a tunnel by its bearer token with the
// TokenReview API, for the configured audiences only, and caches the
// answers. Its Authenticate method is a server.Authenticator.
type TokenAuthenticator struct {
	reviews     TokenReviewer
	audiences   []string
	ttl         time.Duration
	failTTL     time.Duration
	allowNonJWT bool
	cache       *cache[[sha256.Size]byte, tokenResult]
	guard       *guard
	now         func() time.Time
}

// tokenResult is a cached review: an identity (without its peer) or a
// refusal.
type tokenResult struct {
	id      server.Identity
	refusal *status.Status
}

// NewTokenAuthenticator returns an authenticator that asks reviews.
func NewTokenAuthenticator(reviews TokenReviewer, cfg TokenAuthenticatorConfig) (*TokenAuthenticator, error) {
	if reviews == nil {
		return nil, errors.New("auth: no TokenReview client")
	}
	auds := slices.DeleteFunc(slices.Clone(cfg.Audiences), func(s string) bool { return s == "" })
	if len(auds) == 0 {
		return nil, errors.New("auth: token audiences are required")
	}
	a := &TokenAuthenticator{
		reviews:   reviews,
		audiences: auds,
		ttl:       orDefault(cfg.CacheTTL, defaultTokenCacheTTL),
		failTTL:   orDefault(cfg.FailureCacheTTL, defaultTokenFailureTTL),
		now:       time.Now,
		guard:     newGuard("token", cfg.Limits),
	}
	a.allowNonJWT = cfg.AllowNonJWT
	a.cache = newCache[[sha256.Size]byte, tokenResult](orDefault(cfg.CacheSize, defaultCacheSize), func() time.Time { return a.now() })
	return a, nil
}

func orDefault[T int | time.Duration](v, def T) T {
	if v == 0 {
		return def
	}
	return v
}

// Authenticate identifies the caller of a Connect stream by the bearer
// token in its "authorization" metadata. A missing, malformed, invalid,
// expired or wrong-audience token is UNAUTHENTICATED, and so is a token
// sent without TLS by a peer that is not on loopback or a unix socket
// (it crossed a network in clear); a TokenReview that cannot be made is
// UNAVAILABLE.
func (a *TokenAuthenticator) Authenticate(ctx context.Context) (server.Identity, error) {
	token, err := BearerToken(ctx)
	if err != nil {
		return server.Identity{}, err
	}
	if p, _ := peer.FromContext(ctx); inClear(p) {
		return server.Identity{}, status.Error(codes.Unauthenticated, "bearer token sent without TLS from a peer that is not local: refused, and to be considered leaked")
	}
	id, err := a.AuthenticateToken(ctx, token)
	if err != nil {
		return server.Identity{}, err
	}
	id.Peer, _ = peer.FromContext(ctx)
	return id, nil
}

// AuthenticateToken reviews token (or reuses a cached review of it, or
// one under way).
func (a *TokenAuthenticator) AuthenticateToken(ctx context.Context, token string) (server.Identity, error) {
	if len(token) > maxTokenSize {
		reviewsAvoided.WithLabelValues("token", "too_large").Inc()
		return server.Identity{}, status.Errorf(codes.Unauthenticated, "bearer token longer than %d bytes", maxTokenSize)
	}
	key := sha256.Sum256([]byte(token))
	if r, ok := a.cache.get(key); ok {
		reviewsAvoided.WithLabelValues("token", "cached").Inc()
		if r.refusal != nil {
			return server.Identity{}, r.refusal.Err()
		}
		return r.id, nil
	}
	if st, reason := a.precheck(token); st != nil {
		reviewsAvoided.WithLabelValues("token", reason).Inc()
		return server.Identity{}, st.Err()
	}
	v, err := a.guard.do(ctx, key, func(ctx context.Context) (any, error) { return a.review(ctx, key, token) })
	if err != nil {
		return server.Identity{}, err
	}
	return v.(server.Identity), nil
}

// review asks the API server about token and caches the answer.
func (a *TokenAuthenticator) review(ctx context.Context, key [sha256.Size]byte, token string) (server.Identity, error) {
	review, err := a.reviews.Create(ctx, &authnv1.TokenReview{
		Spec: authnv1.TokenReviewSpec{Token: token, Audiences: a.audiences},
	}, metav1.CreateOptions{})
	if err != nil {
		// Not the caller's fault, and not cached: the next attempt asks again.
		reviewsTotal.WithLabelValues("token", "error").Inc()
		return server.Identity{}, status.Errorf(codes.Unavailable, "cannot review the token: %v", err)
	}
	now := a.now()
	st := review.Status
	var refusal *status.Status
	switch {
	case !st.Authenticated:
		msg := "invalid bearer token"
		if st.Error != "" {
			msg += ": " + st.Error
		}
		refusal = status.New(codes.Unauthenticated, msg)
	case !intersects(st.Audiences, a.audiences):
		refusal = status.Newf(codes.Unauthenticated, "bearer token is not valid for audiences %q", a.audiences)
	case st.User.Username == "":
		refusal = status.New(codes.Unauthenticated, "token review returned no user")
	}
	if refusal != nil {
		reviewsTotal.WithLabelValues("token", "refused").Inc()
		if a.failTTL > 0 {
			a.cache.put(key, tokenResult{refusal: refusal}, now.Add(a.failTTL))
		}
		return server.Identity{}, refusal.Err()
	}
	reviewsTotal.WithLabelValues("token", "accepted").Inc()
	id := server.Identity{
		User:   st.User.Username,
		UID:    st.User.UID,
		Groups: slices.Clone(st.User.Groups),
	}
	if len(st.User.Extra) > 0 {
		id.Extra = make(map[string][]string, len(st.User.Extra))
		for k, v := range st.User.Extra {
			id.Extra[k] = slices.Clone(v)
		}
	}
	if exp, ok := TokenExpiry(token); ok {
		id.ExpiresAt = exp
	}
	if a.ttl > 0 {
		until := now.Add(a.ttl)
		if !id.ExpiresAt.IsZero() && id.ExpiresAt.Before(until) {
			until = id.ExpiresAt
		}
		a.cache.put(key, tokenResult{id: id}, until)
	}
	return id, nil
}

// precheck refuses, without a review, a token that cannot be one the API
// server would accept for our audiences: not a JWT (unless AllowNonJWT),
// not for our audiences, or expired. It reads the claims unverified: what
// it lets through still goes to the TokenReview. The reason is the
// metric's label.
func (a *TokenAuthenticator) precheck(token string) (*status.Status, string) {
	claims, ok := jwtClaims(token)
	if !ok {
		if a.allowNonJWT {
			return nil, ""
		}
		return status.New(codes.Unauthenticated, "bearer token is not a JSON Web Token"), "malformed"
	}
	if !intersects(claims.Aud, a.audiences) {
		return status.Newf(codes.Unauthenticated, "bearer token is not valid for audiences %q", a.audiences), "audience"
	}
	if exp, ok := claims.expiry(); ok && !a.now().Before(exp.Add(clockSkew)) {
		return status.New(codes.Unauthenticated, "bearer token has expired"), "expired"
	}
	return nil, ""
}

// inClear reports a peer that reached the server without TLS over a
// network: TCP from an address that is not loopback.
func inClear(p *peer.Peer) bool {
	if p == nil {
		return false
	}
	tcp, ok := p.Addr.(*net.TCPAddr)
	return ok && !tcp.IP.IsLoopback() && p.AuthInfo == nil
}

func intersects(a, b []string) bool {
	for _, s := range a {
		if slices.Contains(b, s) {
			return true
		}
	}
	return false
}

// BearerToken returns the bearer token of an incoming call's
// "authorization" metadata, or an UNAUTHENTICATED error when there is none
// or it is not a single bearer token.
func BearerToken(ctx context.Context) (string, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	vals := md.Get("authorization")
	switch len(vals) {
	case 0:
		return "", status.Error(codes.Unauthenticated, "no bearer token")
	case 1:
	default:
		return "", status.Error(codes.Unauthenticated, "more than one authorization header")
	}
	scheme, token, _ := strings.Cut(vals[0], " ")
	token = strings.TrimSpace(token)
	if !strings.EqualFold(scheme, "Bearer") || token == "" {
		return "", status.Error(codes.Unauthenticated, "authorization is not a bearer token")
	}
	return token, nil
}

// TokenExpiry returns the expiry ("exp" claim) of a JSON Web Token, such as
// a ServiceAccount token. It does NOT verify the token: use it only on a
// token the API server has accepted. ok is false when token is not a JWT
// or has no expiry.
func TokenExpiry(token string) (exp time.Time, ok bool) {
	claims, ok := jwtClaims(token)
	if !ok {
		return time.Time{}, false
	}
	return claims.expiry()
}

// claims are the JWT claims this package reads.
type claims struct {
	Exp *json.Number `json:"exp"`
	Aud audience     `json:"aud"`
}

// audience is the "aud" claim: a string or an array of strings.
type audience []string

func (a *audience) UnmarshalJSON(b []byte) error {
	var one string
	if err := json.Unmarshal(b, &one); err == nil {
		*a = audience{one}
		return nil
	}
	var many []string
	if err := json.Unmarshal(b, &many); err != nil {
		return err
	}
	*a = many
	return nil
}

func (c claims) expiry() (time.Time, bool) {
	if c.Exp == nil {
		return time.Time{}, false
	}
	f, err := c.Exp.Float64()
	if err != nil || math.IsNaN(f) || f <= 0 || f > 1<<40 {
		return time.Time{}, false
	}
	sec, frac := math.Modf(f)
	return time.Unix(int64(sec), int64(frac*1e9)), true
}

// jwtClaims decodes the claims of a compact JWT (three base64url parts,
// the first two JSON objects), without verifying anything.
func jwtClaims(token string) (claims, bool) {
	var c claims
	parts := strings.Split(token, ".")
	if len(parts) != 3 || parts[2] == "" {
		return c, false
	}
	var header struct {
		Alg string `json:"alg"`
	}
	raw, err := base64.RawURLEncoding.DecodeString(strings.TrimRight(parts[0], "="))
	if err != nil || json.Unmarshal(raw, &header) != nil || header.Alg == "" {
		return c, false
	}
	payload, err := base64.RawURLEncoding.DecodeString(strings.TrimRight(parts[1], "="))
	if err != nil || json.Unmarshal(payload, &c) != nil {
		return c, false
	}
	return c, true
}
