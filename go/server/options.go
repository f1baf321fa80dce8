package server

import (
	"context"
	"net"
	"time"

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

// WithMaxConcurrentStreams sets how many plugin-initiated streams a tunnel
// may hold open. Protocol version 1 has none; the option exists for
// symmetry with the plugin side. Default 100.
func WithMaxConcurrentStreams(n int) Option {
	return optionFunc(func(c *config) { c.settings.MaxConcurrentStreams = n })
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
// nobody is authenticated and Identity carries only the transport peer.
func WithAuthenticator(a Authenticator) Option {
	return optionFunc(func(c *config) { c.authenticate = a })
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
