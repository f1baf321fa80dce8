package server

import (
	"context"
	"net"
	"time"

	"github.com/go-logr/logr"
	"google.golang.org/grpc"

	"github.com/guilhem/operator-plugin-framework/go/internal/tunnel"
	"github.com/guilhem/operator-plugin-framework/go/registry"
)

// Option configures a Server.
type Option interface {
	apply(*config)
}

type optionFunc func(*config)

func (f optionFunc) apply(c *config) { f(c) }

type config struct {
	grpcOptions      []grpc.ServerOption
	settings         tunnel.Settings
	drainTimeout     time.Duration
	handshakeTimeout time.Duration
	policy           RegistrationPolicy
	authenticate     Authenticator
	registry         *registry.Registry
	listener         net.Listener
	replicaID        string
	replicaCount     int
	security         securityConfig // security.go
	limits           limits         // limits.go
	localProxy       localProxy     // proxy.go
	logger           *logr.Logger
	authenticated    bool // WithAuthenticator was given
	insecureNoAuth   bool
	requireTLS       bool
	tls              bool // WithTLS was given
	revalidate       time.Duration
}

const (
	defaultDrainTimeout     = 10 * time.Second
	defaultHandshakeTimeout = 10 * time.Second
	// heartbeatCapFactor: a plugin may ask for heartbeats at most this many
	// times less often than the server's interval (spec 11), so that it
	// cannot switch off the detection of its own death.
	heartbeatCapFactor = 2
)

// WithGRPCServerOptions adds options to the gRPC server that serves the
// tunnels (credentials, interceptors, stats handlers, ...).
func WithGRPCServerOptions(opts ...grpc.ServerOption) Option {
	return optionFunc(func(c *config) { c.grpcOptions = append(c.grpcOptions, opts...) })
}

// WithMaxMessageSize sets the largest response a plugin may send, in bytes.
// Default 4 MiB.
func WithMaxMessageSize(n int) Option {
	return optionFunc(func(c *config) { c.settings.MaxMessageSize = n })
}

// WithInitialWindowSize sets the flow-control window of each call for data
// coming from plugins, in bytes. Default 2 MiB.
func WithInitialWindowSize(n int) Option {
	return optionFunc(func(c *config) { c.settings.InitialWindowSize = n })
}

// WithMaxBatchSize sets the largest batch of frames a plugin may send in
// one gRPC message, in bytes (at least 64 KiB): the most that decoding one
// batch makes the server hold per tunnel, registered or not. Larger
// messages are refused by gRPC before they are read. Default 256 KiB.
func WithMaxBatchSize(n int) Option {
	return optionFunc(func(c *config) { c.settings.MaxBatchSize = n })
}

// WithHeartbeatInterval sets how often each side of a tunnel pings the
// other; a plugin silent for 1.5 intervals is considered gone and its calls
// fail with UNAVAILABLE. A plugin may ask for a longer interval, up to twice
// this one. Default 10 s.
func WithHeartbeatInterval(d time.Duration) Option {
	return optionFunc(func(c *config) { c.settings.HeartbeatInterval = d })
}

// WithDrainTimeout bounds how long shutdown waits for calls in flight before
// closing the tunnels. Default 10 s.
func WithDrainTimeout(d time.Duration) Option {
	return optionFunc(func(c *config) { c.drainTimeout = d })
}

// WithHandshakeTimeout bounds how long a new tunnel may take to register.
// Default 10 s.
func WithHandshakeTimeout(d time.Duration) Option {
	return optionFunc(func(c *config) { c.handshakeTimeout = d })
}

// WithRegistrationPolicy decides which registrations are accepted. By
// default every registration is.
func WithRegistrationPolicy(p RegistrationPolicy) Option {
	return optionFunc(func(c *config) { c.policy = p })
}

// WithAuthenticator sets how a tunnel's caller is identified. By default
// nobody is authenticated and Identity carries only the transport peer,
// which New accepts only on a unix socket (see
// WithInsecureNoAuthentication).
//
// The server runs the authenticator, and the registration policy, again
// on every open tunnel from time to time (WithRevalidationInterval) with
// the tunnel's original context, and drains the tunnel when they refuse.
// IsRevalidation tells such a run from a new tunnel's.
func WithAuthenticator(a Authenticator) Option {
	return optionFunc(func(c *config) { c.authenticate, c.authenticated = a, true })
}

// WithInsecureNoAuthentication lets the server listen on TCP without an
// authenticator: anyone who reaches the port can then register as any
// plugin and receive its calls. New refuses that combination otherwise.
// For tests and trusted networks only; a unix socket needs no such option.
func WithInsecureNoAuthentication() Option {
	return optionFunc(func(c *config) { c.insecureNoAuth = true })
}

// WithRequireTLS makes Start fail unless the server serves TLS (WithTLS),
// or listens on a unix socket or a loopback address, so that the bearer
// tokens plugins send never cross a network in clear. auth.BuiltIn sets
// it.
func WithRequireTLS() Option {
	return optionFunc(func(c *config) { c.requireTLS = true })
}

// WithRevalidationInterval sets how often the authenticator and the
// registration policy are run again on each open tunnel (with 10 % of
// jitter). A tunnel they refuse (UNAUTHENTICATED, PERMISSION_DENIED: a
// revoked token, a deleted ServiceAccount, a removed RoleBinding) is
// drained with that status; a run that cannot decide (UNAVAILABLE, for
// example the API server is down or the review rate limit is reached) is
// retried after 5 s (or the interval, if shorter) and keeps the tunnel. With the auth package's caches,
// whose default lifetime is also a minute, each tunnel's token is reviewed
// again about once a minute. Only when an authenticator is set. Default
// 1 minute; negative disables it.
func WithRevalidationInterval(d time.Duration) Option {
	return optionFunc(func(c *config) { c.revalidate = d })
}

// WithLogger sets the server's logger. Default: the logger of the context
// given to Start (log.FromContext), which is controller-runtime's global
// logger (ctrl.Log) unless the context carries another. Lines about peers
// are rate-limited whichever logger is used.
func WithLogger(lg logr.Logger) Option {
	return optionFunc(func(c *config) { c.logger = &lg })
}

// WithMaxConnections bounds the connections the server holds: total in
// all, and perPeer from one IP address, so that one pod cannot take them
// all. A connection over a limit is closed as soon as it is accepted
// (metric plugin_framework_server_connections_refused_total, reason
// "limit" or "peer_limit"), and the plugin retries with backoff. Each
// plugin tunnel normally has a connection of its own; a proxy in front of
// the server (one peer) carries up to WithMaxStreamsPerConnection tunnels
// on each of its connections. Defaults 1024 and 64; negative: no limit.
func WithMaxConnections(total, perPeer int) Option {
	return optionFunc(func(c *config) { c.limits.maxConns, c.limits.maxConnsPer = total, perPeer })
}

// WithMaxUnregisteredTunnels bounds the tunnels that are being
// authenticated or have not registered yet: total in all, and perPeer from
// one peer (its IP address until it is authenticated, then its user). A
// tunnel over a limit waits in line for a place, up to half the handshake
// timeout (at most 5 s) and while fewer than 4 × total tunnels wait (256
// with the defaults); beyond, it ends with RESOURCE_EXHAUSTED and the
// plugin retries with backoff. Defaults 64 and 8; negative: no limit.
//
// Every client of a unix socket, and every tunnel a local proxy forwards
// before it is authenticated, counts as one peer: an operator that many
// plugins reach that way, or that thousands of plugins of one
// ServiceAccount reach, needs a larger perPeer (and WithMaxConnections) to
// take them back quickly after a restart.
func WithMaxUnregisteredTunnels(total, perPeer int) Option {
	return optionFunc(func(c *config) { c.limits.maxUnregistered, c.limits.maxUnregisteredPer = total, perPeer })
}

// WithMaxStreamsPerConnection bounds the concurrent streams (tunnels, or
// tunnels waiting to register) one HTTP/2 connection may carry: gRPC's
// MaxConcurrentStreams. A plugin needs one per tunnel; a proxy in front of
// the server opens more connections when one is full. Default 32;
// negative: gRPC's default (no limit).
func WithMaxStreamsPerConnection(n int) Option {
	return optionFunc(func(c *config) { c.limits.maxStreamsPerConn = n })
}

// WithMaxHeaderListSize bounds the request headers of a Connect call, in
// bytes (gRPC's MaxHeaderListSize): what a peer can make the server hold
// before any check. A bearer token is 1-2 KiB. Default 16 KiB; negative:
// gRPC's default (16 MiB).
func WithMaxHeaderListSize(n int) Option {
	return optionFunc(func(c *config) { c.limits.maxHeaderListSize = n })
}

// WithConnectionIdleTimeout closes connections that carry no tunnel for d
// (gRPC's MaxConnectionIdle, with a GoAway). Default 1 minute; negative:
// never.
func WithConnectionIdleTimeout(d time.Duration) Option {
	return optionFunc(func(c *config) { c.limits.connIdle = d })
}

// WithMaxConnectionAge ends connections once they are age old (gRPC's
// MaxConnectionAge, ±10 %) with a GoAway; tunnels on them get grace more
// to finish (0: as long as they need), then the connection closes.
// Plugins reconnect at once on a new connection, which is how a rotated
// serving certificate (WithTLS) reaches every plugin. Default: no limit.
// Set it through this option rather than grpc.KeepaliveParams, which
// would replace the server's keepalive settings.
func WithMaxConnectionAge(age, grace time.Duration) Option {
	return optionFunc(func(c *config) { c.limits.maxConnAge, c.limits.maxConnAgeGrace = age, grace })
}

// WithRegistry makes the server record plugins in r instead of a registry
// of its own.
func WithRegistry(r *registry.Registry) Option {
	return optionFunc(func(c *config) { c.registry = r })
}

// WithReplica identifies this operator process among the operator's
// replicas, so that a plugin keeps one tunnel to each (docs/tunnel-spec.md,
// 14.3): id must be unique among the replicas (at most 253 bytes), and
// count is how many replicas run (0 when unknown). Behind a load-balanced
// Service, plugins keep connecting until they hold count distinct replicas;
// with a headless Service they reach every replica anyway.
//
// Default: id is the host name (the pod name in Kubernetes) followed by a
// dash and 8 random hex digits; count is 0.
func WithReplica(id string, count int) Option {
	return optionFunc(func(c *config) { c.replicaID, c.replicaCount = id, count })
}

// WithListener serves on lis instead of listening on the address given to
// New (which then only names the server in logs).
func WithListener(lis net.Listener) Option {
	return optionFunc(func(c *config) { c.listener = lis })
}

// Authenticator identifies the caller of a Connect stream from its context
// (peer, TLS state, metadata). An error, ideally a status with code
// UNAUTHENTICATED, refuses the tunnel.
type Authenticator func(ctx context.Context) (Identity, error)

// RegistrationPolicy accepts a registration by returning nil or refuses it
// with an error; a status error's code and message reach the plugin, any
// other error is reported as PERMISSION_DENIED.
type RegistrationPolicy func(ctx context.Context, id Identity, reg Registration) error
