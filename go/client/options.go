package client

import (
	"context"
	"log/slog"
	"time"

	"github.com/go-logr/logr"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials"

	"github.com/guilhem/operator-plugin-framework/go/internal/target"
	"github.com/guilhem/operator-plugin-framework/go/internal/tunnel"
)

// Option configures a Client.
type Option interface {
	apply(*config)
}

type optionFunc func(*config)

func (f optionFunc) apply(c *config) { f(c) }

type service struct {
	desc *grpc.ServiceDesc
	impl any
}

type config struct {
	services         []service
	lookup           target.LookupHost
	resolveInterval  time.Duration
	unary            []grpc.UnaryServerInterceptor
	stream           []grpc.StreamServerInterceptor
	labels           map[string]string
	backoff          backoff.Config
	dialOptions      []grpc.DialOption
	transportCreds   credentials.TransportCredentials
	perRPCCreds      credentials.PerRPCCredentials
	settings         tunnel.Settings
	drainTimeout     time.Duration
	handshakeTimeout time.Duration
	logger           logr.Logger
	security         securityConfig // credentials.go
}

func defaultConfig() config {
	return config{
		backoff: backoff.Config{
			BaseDelay:  250 * time.Millisecond,
			Multiplier: 1.6,
			Jitter:     0.2,
			MaxDelay:   30 * time.Second,
		},
		drainTimeout:     10 * time.Second,
		handshakeTimeout: 10 * time.Second,
		resolveInterval:  30 * time.Second,
		logger:           logr.FromSlogHandler(slog.Default().Handler()),
	}
}

// WithService serves one more gRPC service through the tunnel; impl must
// implement desc's handler interface.
func WithService(desc *grpc.ServiceDesc, impl any) Option {
	return optionFunc(func(c *config) { c.services = append(c.services, service{desc, impl}) })
}

// WithUnaryInterceptor adds server interceptors for unary calls, run in the
// order given, the first outermost.
func WithUnaryInterceptor(i ...grpc.UnaryServerInterceptor) Option {
	return optionFunc(func(c *config) { c.unary = append(c.unary, i...) })
}

// WithStreamInterceptor adds server interceptors for streaming calls.
func WithStreamInterceptor(i ...grpc.StreamServerInterceptor) Option {
	return optionFunc(func(c *config) { c.stream = append(c.stream, i...) })
}

// WithLabels attaches free-form labels to the registration (for example the
// pod name). None by default.
func WithLabels(labels map[string]string) Option {
	return optionFunc(func(c *config) { c.labels = labels })
}

// WithBackoff sets the reconnection backoff. Default: 250 ms base, factor
// 1.6, jitter 0.2, at most 30 s. It is reset after each registration.
func WithBackoff(b backoff.Config) Option {
	return optionFunc(func(c *config) { c.backoff = b })
}

// WithDialOptions adds options to the gRPC connection to the operator.
func WithDialOptions(opts ...grpc.DialOption) Option {
	return optionFunc(func(c *config) { c.dialOptions = append(c.dialOptions, opts...) })
}

// WithTransportCredentials secures the connection to the operator, for
// example with credentials.NewTLS. Default: none (plaintext), fit only for
// a unix socket.
func WithTransportCredentials(creds credentials.TransportCredentials) Option {
	return optionFunc(func(c *config) { c.transportCreds = creds })
}

// WithPerRPCCredentials attaches credentials (such as a bearer token) to
// each tunnel the client opens. None by default.
func WithPerRPCCredentials(creds credentials.PerRPCCredentials) Option {
	return optionFunc(func(c *config) { c.perRPCCreds = creds })
}

// WithMaxMessageSize sets the largest request the operator may send, in
// bytes. Default 4 MiB.
func WithMaxMessageSize(n int) Option {
	return optionFunc(func(c *config) { c.settings.MaxMessageSize = n })
}

// WithInitialWindowSize sets the flow-control window of each call for data
// coming from the operator, in bytes. Default 2 MiB.
func WithInitialWindowSize(n int) Option {
	return optionFunc(func(c *config) { c.settings.InitialWindowSize = n })
}

// WithMaxConcurrentStreams sets how many calls the operator may have open
// at once on one tunnel; more wait for a free slot. Default 100.
func WithMaxConcurrentStreams(n int) Option {
	return optionFunc(func(c *config) { c.settings.MaxConcurrentStreams = n })
}

// WithHeartbeatInterval asks for heartbeats no more often than d; the
// operator's interval applies when it is longer. Default: no preference.
func WithHeartbeatInterval(d time.Duration) Option {
	return optionFunc(func(c *config) { c.settings.HeartbeatInterval = d })
}

// WithDrainTimeout bounds how long Close waits for calls in flight.
// Default 10 s.
func WithDrainTimeout(d time.Duration) Option {
	return optionFunc(func(c *config) { c.drainTimeout = d })
}

// WithHandshakeTimeout bounds each connection attempt, from dialling to the
// operator's answer to the registration. Default 10 s.
func WithHandshakeTimeout(d time.Duration) Option {
	return optionFunc(func(c *config) { c.handshakeTimeout = d })
}

// WithLogger sets the logger. Default: the standard library's default
// slog logger (log/slog), so that a wrong target or a refused registration
// shows on standard error with no setup; a plugin running a
// controller-runtime manager passes ctrl.Log.
func WithLogger(l logr.Logger) Option {
	return optionFunc(func(c *config) { c.logger = l })
}

// LookupHost resolves a host name to IP addresses, as
// net.Resolver.LookupHost does.
type LookupHost func(ctx context.Context, host string) ([]string, error)

// WithLookupHost resolves the host of a DNS target with lookup instead of
// the system's resolver (net.DefaultResolver), for tests and custom
// discovery.
func WithLookupHost(lookup LookupHost) Option {
	return optionFunc(func(c *config) { c.lookup = target.LookupHost(lookup) })
}

// WithResolveInterval sets how often the target is resolved again, to find
// operator replicas that appeared or left (it is also resolved whenever a
// tunnel is lost). Default 30 s.
func WithResolveInterval(d time.Duration) Option {
	return optionFunc(func(c *config) { c.resolveInterval = d })
}
