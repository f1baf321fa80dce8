package auth

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"math"
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
}

const (
	defaultTokenCacheTTL   = time.Minute
	defaultTokenFailureTTL = 10 * time.Second
	defaultCacheSize       = 1024
)

// TokenAuthenticator authenticates a tunnel by its bearer token with the
// TokenReview API, for the configured audiences only, and caches the
// answers. Its Authenticate method is a server.Authenticator.
type TokenAuthenticator struct {
	reviews   TokenReviewer
	audiences []string
	ttl       time.Duration
	failTTL   time.Duration
	cache     *cache[[sha256.Size]byte, tokenResult]
	now       func() time.Time
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
	}
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
// expired or wrong-audience token is UNAUTHENTICATED; a TokenReview that
// cannot be made is UNAVAILABLE.
func (a *TokenAuthenticator) Authenticate(ctx context.Context) (server.Identity, error) {
	token, err := BearerToken(ctx)
	if err != nil {
		return server.Identity{}, err
	}
	id, err := a.AuthenticateToken(ctx, token)
	if err != nil {
		return server.Identity{}, err
	}
	id.Peer, _ = peer.FromContext(ctx)
	return id, nil
}

// AuthenticateToken reviews token (or reuses a cached review of it).
func (a *TokenAuthenticator) AuthenticateToken(ctx context.Context, token string) (server.Identity, error) {
	key := sha256.Sum256([]byte(token))
	if r, ok := a.cache.get(key); ok {
		if r.refusal != nil {
			return server.Identity{}, r.refusal.Err()
		}
		return r.id, nil
	}
	review, err := a.reviews.Create(ctx, &authnv1.TokenReview{
		Spec: authnv1.TokenReviewSpec{Token: token, Audiences: a.audiences},
	}, metav1.CreateOptions{})
	if err != nil {
		// Not the caller's fault, and not cached: the next attempt asks again.
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
		if a.failTTL > 0 {
			a.cache.put(key, tokenResult{refusal: refusal}, now.Add(a.failTTL))
		}
		return server.Identity{}, refusal.Err()
	}
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
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return time.Time{}, false
	}
	payload, err := base64.RawURLEncoding.DecodeString(strings.TrimRight(parts[1], "="))
	if err != nil {
		return time.Time{}, false
	}
	var claims struct {
		Exp *json.Number `json:"exp"`
	}
	if err := json.Unmarshal(payload, &claims); err != nil || claims.Exp == nil {
		return time.Time{}, false
	}
	f, err := claims.Exp.Float64()
	if err != nil || math.IsNaN(f) || f <= 0 || f > 1<<40 {
		return time.Time{}, false
	}
	sec, frac := math.Modf(f)
	return time.Unix(int64(sec), int64(frac*1e9)), true
}
