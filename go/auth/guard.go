package auth

import (
	"context"
	"crypto/sha256"
	"net"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/singleflight"
	"golang.org/x/time/rate"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"sigs.k8s.io/controller-runtime/pkg/metrics"

	"github.com/guilhem/operator-plugin-framework/go/server"
)

// ReviewLimits bound the load that tunnels, authenticated or not, can put
// on the API server through one TokenAuthenticator or Authorizer. Reviews
// refused by a limit fail with UNAVAILABLE, are not cached, and the plugin
// retries with backoff. The zero value is the defaults.
type ReviewLimits struct {
	// Timeout bounds each review. Default 5 s.
	Timeout time.Duration
	// MaxInFlight bounds the reviews under way at once. Default 16.
	MaxInFlight int
	// Rate and Burst bound how many reviews start, per second and at once
	// (a token bucket). Runs on tunnels that are already registered
	// (server.IsRevalidation) are not counted: there are as many of them
	// as tunnels, whatever peers send. Defaults 20 and 40; a negative
	// Rate disables the limit.
	Rate  float64
	Burst int
	// PeerRate and PeerBurst bound the same for the tunnels of one peer
	// IP address, so that one pod cannot spend the whole budget and keep
	// every other plugin from connecting. Defaults 2 and 10; a negative
	// PeerRate disables the limit.
	PeerRate  float64
	PeerBurst int
}

const (
	defaultReviewTimeout = 5 * time.Second
	defaultMaxInFlight   = 16
	defaultReviewRate    = 20
	defaultReviewBurst   = 40
	defaultPeerRate      = 2
	defaultPeerBurst     = 10
	// maxPeers bounds the peers tracked for PeerRate; idle ones are
	// forgotten first.
	maxPeers = 4096
)

// Metrics of the reviews, served with controller-runtime's own.
var (
	reviewsTotal = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "plugin_framework", Subsystem: "auth",
		Name: "reviews_total",
		Help: "TokenReviews (kind=token) and SubjectAccessReviews (kind=access) sent to the API server, by result: accepted, refused, error.",
	}, []string{"kind", "result"})
	reviewsInFlight = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: "plugin_framework", Subsystem: "auth",
		Name: "reviews_in_flight",
		Help: "Reviews under way.",
	}, []string{"kind"})
	reviewsAvoided = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "plugin_framework", Subsystem: "auth",
		Name: "reviews_avoided_total",
		Help: "Reviews not sent, by reason: malformed, audience, expired, too_large (the token's own shape), peer_rate_limited, rate_limited, in_flight_limit, coalesced (an identical review was under way), cached.",
	}, []string{"kind", "reason"})
)

func init() {
	metrics.Registry.MustRegister(reviewsTotal, reviewsInFlight, reviewsAvoided)
}

// guard runs the reviews of one authenticator or authorizer within its
// limits, one review for all concurrent callers with the same key.
type guard struct {
	kind    string // metric label
	timeout time.Duration
	slots   chan struct{}
	limiter *rate.Limiter // nil: no rate limit
	flights singleflight.Group

	peerRate  rate.Limit // 0: no per-peer limit
	peerBurst int
	mu        sync.Mutex
	peers     map[string]*rate.Limiter
}

func newGuard(kind string, l ReviewLimits) *guard {
	g := &guard{
		kind:    kind,
		timeout: orDefault(l.Timeout, defaultReviewTimeout),
		slots:   make(chan struct{}, max(orDefault(l.MaxInFlight, defaultMaxInFlight), 1)),
	}
	if r := orDefaultFloat(l.Rate, defaultReviewRate); r > 0 {
		g.limiter = rate.NewLimiter(rate.Limit(r), max(orDefault(l.Burst, defaultReviewBurst), 1))
	}
	if r := orDefaultFloat(l.PeerRate, defaultPeerRate); r > 0 {
		g.peerRate, g.peerBurst = rate.Limit(r), max(orDefault(l.PeerBurst, defaultPeerBurst), 1)
		g.peers = map[string]*rate.Limiter{}
	}
	return g
}

// peerAllows takes a review from the budget of ctx's peer.
func (g *guard) peerAllows(ctx context.Context) bool {
	if g.peers == nil {
		return true
	}
	key := "unknown"
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		key = p.Addr.String()
		if tcp, ok := p.Addr.(*net.TCPAddr); ok {
			key = tcp.IP.String()
		}
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	lim := g.peers[key]
	if lim == nil {
		if len(g.peers) >= maxPeers {
			for k, l := range g.peers {
				if l.Tokens() >= float64(g.peerBurst) {
					delete(g.peers, k) // idle: as good as new
				}
			}
		}
		if len(g.peers) >= maxPeers {
			return false
		}
		lim = rate.NewLimiter(g.peerRate, g.peerBurst)
		g.peers[key] = lim
	}
	return lim.Allow()
}

func orDefaultFloat(v, def float64) float64 {
	if v == 0 {
		return def
	}
	return v
}

// do returns review's answer for key: a review already under way for the
// same key is shared instead of sent again. review runs with a context of
// its own, bounded by the timeout, so that one caller giving up does not
// fail the others waiting for the same answer; each caller waits no
// longer than its own context.
func (g *guard) do(ctx context.Context, key [sha256.Size]byte, review func(context.Context) (any, error)) (any, error) {
	revalidation := server.IsRevalidation(ctx)
	led := false // whether this caller's review is the one that ran
	ch := g.flights.DoChan(string(key[:]), func() (any, error) {
		led = true
		if !revalidation && !g.peerAllows(ctx) {
			reviewsAvoided.WithLabelValues(g.kind, "peer_rate_limited").Inc()
			return nil, status.Error(codes.Unavailable, "too many reviews for this peer: retry later")
		}
		if g.limiter != nil && !revalidation && !g.limiter.Allow() {
			reviewsAvoided.WithLabelValues(g.kind, "rate_limited").Inc()
			return nil, status.Error(codes.Unavailable, "too many reviews: the operator's rate limit towards the API server is reached, retry later")
		}
		select {
		case g.slots <- struct{}{}:
		default:
			reviewsAvoided.WithLabelValues(g.kind, "in_flight_limit").Inc()
			return nil, status.Errorf(codes.Unavailable, "too many reviews in flight (%d), retry later", cap(g.slots))
		}
		defer func() { <-g.slots }()
		reviewsInFlight.WithLabelValues(g.kind).Inc()
		defer reviewsInFlight.WithLabelValues(g.kind).Dec()
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), g.timeout)
		defer cancel()
		return review(rctx)
	})
	select {
	case r := <-ch:
		if r.Shared && !led {
			reviewsAvoided.WithLabelValues(g.kind, "coalesced").Inc()
		}
		return r.Val, r.Err
	case <-ctx.Done():
		return nil, status.FromContextError(ctx.Err()).Err()
	}
}
