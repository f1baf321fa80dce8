package auth

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	authzv1 "k8s.io/api/authorization/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/guilhem/operator-plugin-framework/go/server"
)

// SubjectAccessReviewer creates SubjectAccessReviews. client-go's
// kubernetes.Interface.AuthorizationV1().SubjectAccessReviews() is one.
type SubjectAccessReviewer interface {
	Create(ctx context.Context, review *authzv1.SubjectAccessReview, opts metav1.CreateOptions) (*authzv1.SubjectAccessReview, error)
}

// AuthorizerConfig configures an Authorizer.
type AuthorizerConfig struct {
	// AllowCacheTTL is how long an allowed decision is reused. Default
	// 1 minute; negative disables caching allowed decisions.
	AllowCacheTTL time.Duration
	// DenyCacheTTL is how long a denied decision is reused. Default 10 s;
	// negative disables caching denied decisions.
	DenyCacheTTL time.Duration
	// CacheSize bounds the number of decisions kept. Default 1024.
	CacheSize int
	// Limits bound the SubjectAccessReviews sent to the API server.
	Limits ReviewLimits
}

const (
	defaultAllowTTL = time.Minute
	defaultDenyTTL  = 10 * time.Second
)

// Authorizer asks the API server, with a SubjectAccessReview, whether an
// identity may do something, and caches the answers. RBAC (or whichever
// authorizers the cluster runs) decides.
type Authorizer struct {
	reviews  SubjectAccessReviewer
	allowTTL time.Duration
	denyTTL  time.Duration
	cache    *cache[[sha256.Size]byte, Decision]
	guard    *guard
	now      func() time.Time
}

// Decision is an authorization answer.
type Decision struct {
	Allowed bool
	// Reason is the authorizer's explanation, often empty.
	Reason string
}

// Attributes is what an identity asks to do: set exactly one of the two.
type Attributes struct {
	Resource    *authzv1.ResourceAttributes
	NonResource *authzv1.NonResourceAttributes
}

// NewAuthorizer returns an authorizer that asks reviews.
func NewAuthorizer(reviews SubjectAccessReviewer, cfg AuthorizerConfig) (*Authorizer, error) {
	if reviews == nil {
		return nil, errors.New("auth: no SubjectAccessReview client")
	}
	a := &Authorizer{
		reviews:  reviews,
		allowTTL: orDefault(cfg.AllowCacheTTL, defaultAllowTTL),
		denyTTL:  orDefault(cfg.DenyCacheTTL, defaultDenyTTL),
		now:      time.Now,
		guard:    newGuard("access", cfg.Limits),
	}
	a.cache = newCache[[sha256.Size]byte, Decision](orDefault(cfg.CacheSize, defaultCacheSize), func() time.Time { return a.now() })
	return a, nil
}

// Authorize decides whether id may do what attrs describe. The error is
// set only when no decision could be had (an UNAVAILABLE status); such
// failures are not cached.
func (a *Authorizer) Authorize(ctx context.Context, id server.Identity, attrs Attributes) (Decision, error) {
	if (attrs.Resource == nil) == (attrs.NonResource == nil) {
		return Decision{}, status.Error(codes.Internal, "auth: set exactly one of resource and non-resource attributes")
	}
	spec := authzv1.SubjectAccessReviewSpec{
		ResourceAttributes:    attrs.Resource,
		NonResourceAttributes: attrs.NonResource,
		User:                  id.User,
		UID:                   id.UID,
		Groups:                slices.Clone(id.Groups),
	}
	if len(id.Extra) > 0 {
		spec.Extra = make(map[string]authzv1.ExtraValue, len(id.Extra))
		for k, v := range id.Extra {
			spec.Extra[k] = slices.Clone(v)
		}
	}
	slices.Sort(spec.Groups)
	// encoding/json sorts map keys, so equal specs give equal keys.
	raw, err := json.Marshal(spec)
	if err != nil {
		return Decision{}, status.Errorf(codes.Internal, "auth: %v", err)
	}
	key := sha256.Sum256(raw)
	if d, ok := a.cache.get(key); ok {
		reviewsAvoided.WithLabelValues("access", "cached").Inc()
		return d, nil
	}
	v, err := a.guard.do(ctx, key, func(ctx context.Context) (any, error) { return a.review(ctx, key, spec) })
	if err != nil {
		return Decision{}, err
	}
	return v.(Decision), nil
}

// review asks the API server and caches a complete answer.
func (a *Authorizer) review(ctx context.Context, key [sha256.Size]byte, spec authzv1.SubjectAccessReviewSpec) (Decision, error) {
	r, err := a.reviews.Create(ctx, &authzv1.SubjectAccessReview{Spec: spec}, metav1.CreateOptions{})
	if err != nil {
		reviewsTotal.WithLabelValues("access", "error").Inc()
		return Decision{}, status.Errorf(codes.Unavailable, "cannot review access: %v", err)
	}
	d := Decision{Allowed: r.Status.Allowed && !r.Status.Denied, Reason: r.Status.Reason}
	if d.Allowed {
		reviewsTotal.WithLabelValues("access", "accepted").Inc()
	} else {
		reviewsTotal.WithLabelValues("access", "refused").Inc()
	}
	if r.Status.EvaluationError != "" && !d.Allowed {
		// RBAC could not evaluate every rule: an incomplete answer, do not
		// remember it.
		return d, nil
	}
	ttl := a.denyTTL
	if d.Allowed {
		ttl = a.allowTTL
	}
	if ttl > 0 {
		a.cache.put(key, d, a.now().Add(ttl))
	}
	return d, nil
}

// AuthorizeConnect wraps authn: once it has identified the caller, a
// SubjectAccessReview must allow the verb "create" on the non-resource path
// ConnectPath. That is the check kube-rbac-proxy makes for the same gRPC
// call, so one ClusterRole grants a plugin the right to connect in both
// modes. A refusal is PERMISSION_DENIED.
func AuthorizeConnect(authn server.Authenticator, authz *Authorizer) server.Authenticator {
	return func(ctx context.Context) (server.Identity, error) {
		id, err := authn(ctx)
		if err != nil {
			return id, err
		}
		d, err := authz.Authorize(ctx, id, Attributes{NonResource: &authzv1.NonResourceAttributes{Path: ConnectPath, Verb: ConnectVerb}})
		if err != nil {
			return server.Identity{}, err
		}
		if !d.Allowed {
			return server.Identity{}, status.Error(codes.PermissionDenied, denied(id, fmt.Sprintf("%s the path %s", ConnectVerb, ConnectPath), d))
		}
		return id, nil
	}
}

func denied(id server.Identity, what string, d Decision) string {
	msg := fmt.Sprintf("%q may not %s", id.User, what)
	if d.Reason != "" {
		msg += ": " + d.Reason
	}
	return msg
}
