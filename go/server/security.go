package server

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/guilhem/operator-plugin-framework/go/internal/tunnel"
)

// securityConfig holds what the options of this file set.
type securityConfig struct {
	err          error         // a WithTLS that could not load its files; New reports it
	maxAge       time.Duration // 0: no limit
	expiryMargin time.Duration // 0: defaultExpiryMargin
	reloader     *certReloader // WithTLS's
}

const (
	// defaultExpiryMargin is how long before its credentials expire a
	// tunnel is drained. A kubelet-projected token is refreshed once 80 %
	// of its lifetime has passed (8 minutes into the shortest, 10-minute,
	// lifetime), so a plugin that reconnects one minute before expiry
	// finds a fresh token in its file.
	defaultExpiryMargin = time.Minute
	// minTunnelLife is the shortest time a tunnel is given before an
	// expiry drain, unless its credentials expire sooner: a margin larger
	// than what is left of a token makes the plugin reconnect every
	// minTunnelLife instead of in a tight loop.
	minTunnelLife = 2 * time.Second
	// maxAgeJitter spreads the drains of tunnels opened together: a tunnel
	// is drained between (1-maxAgeJitter)×max age and max age.
	maxAgeJitter = 0.1
)

// WithTLS makes the server serve TLS with the certificate and private key in
// these PEM files instead of plaintext. Both files are read again, and the
// certificate replaced, whenever their content changes, so a certificate
// renewed in place (a Secret volume updated by cert-manager, for example)
// is served to new connections without a restart; established tunnels keep
// the certificate they were opened with until they are drained. If a
// renewed pair does not load (for example half-written), the previous one
// is kept. New fails if the files cannot be loaded at all.
//
// Default: no TLS, which is fit for a unix socket, or for loopback TCP
// behind kube-rbac-proxy (docs/security.md). It adds a grpc.Creds server
// option: do not add another with WithGRPCServerOptions.
func WithTLS(certFile, keyFile string) Option {
	return optionFunc(func(c *config) {
		r := &certReloader{certFile: certFile, keyFile: keyFile}
		if _, err := r.certificate(); err != nil {
			c.security.err = errors.Join(c.security.err, fmt.Errorf("plugin server TLS: %w", err))
			return
		}
		c.tls = true
		c.security.reloader = r
		c.grpcOptions = append(c.grpcOptions, grpc.Creds(credentials.NewTLS(&tls.Config{
			MinVersion: tls.VersionTLS12,
			GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
				return r.certificate()
			},
		})),
			// crypto/tls buffers what it decrypts: gRPC's own read buffer
			// on top of it copied every byte once more (8-10 % of a TLS
			// stream's CPU) and pinned 32 KiB to each connection.
			grpc.ReadBufferSize(0))
	})
}

// WithMaxTunnelAge bounds how long a tunnel lives: once it is d old (less
// a random 0–10 % so that tunnels opened together do not all reconnect at
// once), the server sends it a GoAway with code UNAVAILABLE and the reason
// "tunnel reached its maximum age"; the plugin opens a new tunnel at once,
// authenticated again with its current credentials, while the old one
// finishes its calls within the drain timeout (WithDrainTimeout).
//
// Behind kube-rbac-proxy the server never sees the plugin's token, so this
// is what bounds how long a tunnel outlives it: set it no longer than the
// plugins' token lifetime. Default: no limit.
func WithMaxTunnelAge(d time.Duration) Option {
	return optionFunc(func(c *config) { c.security.maxAge = d })
}

// WithTokenExpiryMargin sets how long before its credentials expire
// (Identity.ExpiresAt, set by the authenticator) a tunnel is drained the
// same way as by WithMaxTunnelAge, with the reason "credentials expire
// soon". A tunnel is never given less than 2 s unless its credentials
// expire sooner, and its calls never outlast the credentials: the drain
// closes the tunnel at the expiry at the latest. Default 1 minute.
//
// A margin close to the token lifetime makes tunnels short-lived: with
// tokens of the shortest lifetime TokenRequest issues (600 s), a margin of
// 597 s drains every tunnel about 3 s after it opened (the end-to-end tests
// do this to see drains within seconds).
func WithTokenExpiryMargin(d time.Duration) Option {
	return optionFunc(func(c *config) { c.security.expiryMargin = d })
}

// limitLifetime schedules the drain of a registered tunnel at its maximum
// age or before its credentials expire, whichever comes first. The returned
// function cancels it, and waits for a drain in progress to return (the
// tunnel must be closed by then).
func (s *Server) limitLifetime(t *tunnel.Tunnel, id Identity, cause *drainCause, lg logr.Logger) (stop func()) {
	now := time.Now()
	delay, reason, ok := lifetime(now, id.ExpiresAt, s.cfg.security, rand.Float64())
	if !ok {
		return func() {}
	}
	// The drain may take the drain timeout, but calls never outlast the
	// credentials.
	deadline := now.Add(delay + s.cfg.drainTimeout)
	if !id.ExpiresAt.IsZero() && id.ExpiresAt.Before(deadline) {
		deadline = id.ExpiresAt
	}
	var wg sync.WaitGroup
	wg.Add(1)
	timer := time.AfterFunc(delay, func() {
		defer wg.Done()
		lg.Info("draining tunnel", "reason", reason)
		cause.set(reason)
		metric := "max_age"
		if reason == reasonExpiry {
			metric = "expiry"
		}
		tunnelsDrained.WithLabelValues(metric).Inc()
		ctx, cancel := context.WithDeadline(context.Background(), deadline)
		defer cancel()
		t.Drain(ctx, status.New(codes.Unavailable, reason))
	})
	return func() {
		if timer.Stop() {
			wg.Done()
		}
		wg.Wait()
	}
}

const (
	reasonMaxAge = "tunnel reached its maximum age"
	reasonExpiry = "credentials expire soon: reconnect with fresh ones"
)

// lifetime computes when a tunnel opened at now must be drained, and why.
// ok is false when nothing limits it. jitter is a random number in [0, 1).
func lifetime(now, expiresAt time.Time, cfg securityConfig, jitter float64) (delay time.Duration, reason string, ok bool) {
	if cfg.maxAge > 0 {
		delay = cfg.maxAge - time.Duration(float64(cfg.maxAge)*maxAgeJitter*jitter)
		reason, ok = reasonMaxAge, true
	}
	if !expiresAt.IsZero() {
		margin := cfg.expiryMargin
		if margin <= 0 {
			margin = defaultExpiryMargin
		}
		left := expiresAt.Sub(now)
		d := max(left-margin, min(left/2, minTunnelLife), 0)
		if !ok || d < delay {
			delay, reason, ok = d, reasonExpiry, true
		}
	}
	return delay, reason, ok
}

// certReloader serves a certificate read from files, reloaded when the
// files change. Reading two small files per TLS handshake (one per tunnel)
// costs little and, unlike a file watcher, sees every kind of update
// (Kubernetes updates a Secret volume by swapping a symbolic link).
type certReloader struct {
	certFile, keyFile string
	log               atomic.Pointer[logr.Logger]

	mu      sync.Mutex
	certPEM []byte
	keyPEM  []byte
	cert    *tls.Certificate
	failed  [sha256.Size]byte // the pair last refused, logged once
}

func (r *certReloader) setLogger(lg logr.Logger) { r.log.Store(&lg) }

func (r *certReloader) certificate() (*tls.Certificate, error) {
	certPEM, err := os.ReadFile(r.certFile)
	if err != nil {
		return r.fallback(err)
	}
	keyPEM, err := os.ReadFile(r.keyFile)
	if err != nil {
		return r.fallback(err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cert != nil && bytes.Equal(certPEM, r.certPEM) && bytes.Equal(keyPEM, r.keyPEM) {
		return r.cert, nil
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		if r.cert != nil {
			// Probably a rotation half done: keep serving the old pair,
			// and say so once per pair that does not load.
			if h := sha256.Sum256(append(append([]byte(nil), certPEM...), keyPEM...)); h != r.failed {
				r.failed = h
				if lg := r.log.Load(); lg != nil {
					lg.Error(err, "serving certificate not reloaded: keeping the previous one", "certFile", r.certFile, "keyFile", r.keyFile)
				}
			}
			return r.cert, nil
		}
		return nil, err
	}
	r.certPEM, r.keyPEM, r.cert = certPEM, keyPEM, &cert
	return r.cert, nil
}

// fallback keeps the loaded certificate when the files are briefly
// unreadable (for example in the middle of a Secret volume update).
func (r *certReloader) fallback(err error) (*tls.Certificate, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cert != nil {
		return r.cert, nil
	}
	return nil, err
}

type revalidationKey struct{}

// IsRevalidation reports whether ctx is that of a run of the authenticator
// or the registration policy on a tunnel that is already registered (see
// WithRevalidationInterval), rather than on a new tunnel. The auth package
// uses it to exempt such runs from its review rate limit: their number is
// bounded by the registered tunnels, not by what peers send.
func IsRevalidation(ctx context.Context) bool {
	v, _ := ctx.Value(revalidationKey{}).(bool)
	return v
}

const (
	defaultRevalidation = time.Minute
	// revalidationRetry is when a revalidation that could not decide is
	// tried again.
	revalidationRetry = 5 * time.Second
)

// revalidate runs the authenticator and the registration policy again on
// a registered tunnel every revalidation interval, with the tunnel's own
// context (its metadata, its peer), and drains the tunnel once they
// refuse. The returned function stops it, waiting for a drain in progress.
func (s *Server) revalidate(ctx context.Context, t *tunnel.Tunnel, id Identity, reg Registration, cause *drainCause, lg logr.Logger) (stop func()) {
	every := orDefault(s.cfg.revalidate, defaultRevalidation)
	if !s.cfg.authenticated || every < 0 {
		return func() {}
	}
	rctx, cancel := context.WithCancel(context.WithValue(ctx, revalidationKey{}, true))
	// Cost: a timer, not a goroutine per registered tunnel; the check runs
	// in the timer's goroutine, and at most one runs at a time (the timer
	// is armed again only once a check is done).
	var (
		mu      sync.Mutex
		stopped bool
		timer   *time.Timer
		running chan struct{} // closed once the check in progress ends
	)
	check := func() {
		mu.Lock()
		if stopped {
			mu.Unlock()
			return
		}
		ran := make(chan struct{})
		running = ran
		mu.Unlock()
		defer close(ran)
		next := s.revalidateOnce(rctx, t, id, reg, cause, lg, every)
		mu.Lock()
		defer mu.Unlock()
		running = nil
		if next > 0 && !stopped {
			timer.Reset(next)
		}
	}
	mu.Lock()
	timer = time.AfterFunc(jittered(every), check)
	mu.Unlock()
	return func() {
		cancel()
		mu.Lock()
		stopped = true
		timer.Stop()
		ran := running
		mu.Unlock()
		if ran != nil {
			<-ran // a drain in progress
		}
	}
}

// revalidateOnce checks a registered tunnel once, drains it when refused,
// and returns when to check again (0: never).
func (s *Server) revalidateOnce(ctx context.Context, t *tunnel.Tunnel, id Identity, reg Registration, cause *drainCause, lg logr.Logger, every time.Duration) time.Duration {
	select {
	case <-t.Done():
		return 0
	default:
	}
	st := s.recheck(ctx, id, reg)
	switch {
	case st == nil:
		return jittered(every)
	case transient(st.Code()):
		lg.V(1).Info("cannot revalidate tunnel, retrying", "code", st.Code(), "reason", st.Message())
		return min(revalidationRetry, every)
	}
	reason := "credentials no longer accepted: " + st.Message()
	lg.Info("draining tunnel", "reason", reason)
	cause.set(reason)
	tunnelsDrained.WithLabelValues("revoked").Inc()
	dctx, dcancel := context.WithTimeout(context.Background(), s.cfg.drainTimeout)
	defer dcancel()
	t.Drain(dctx, status.New(st.Code(), reason))
	return 0
}

// recheck is the authentication and the policy of a registered tunnel
// again: nil if both still accept it under the same user.
func (s *Server) recheck(ctx context.Context, was Identity, reg Registration) *status.Status {
	id, err := s.cfg.authenticate(ctx)
	if err != nil {
		if st, ok := status.FromError(err); ok {
			return st
		}
		return status.New(codes.Unauthenticated, err.Error())
	}
	if id.User != was.User {
		return status.Newf(codes.PermissionDenied, "the tunnel's user changed from %q to %q", quote(was.User), quote(id.User))
	}
	if err := s.cfg.policy(ctx, id, reg); err != nil {
		return refusal(err)
	}
	return nil
}

// transient codes say that no decision could be had; any other refusal is
// a decision.
func transient(c codes.Code) bool {
	switch c {
	case codes.Unavailable, codes.DeadlineExceeded, codes.ResourceExhausted, codes.Canceled, codes.Aborted:
		return true
	}
	return false
}

// jittered is d less up to 10 %, so that tunnels opened together do not
// all revalidate together.
func jittered(d time.Duration) time.Duration {
	return d - time.Duration(float64(d)*0.1*rand.Float64())
}
