package client

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"

	"github.com/go-logr/logr"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/experimental"

	pb "github.com/guilhem/operator-plugin-framework/go/gen/pluginframework/v1"
	"github.com/guilhem/operator-plugin-framework/go/internal/target"
	"github.com/guilhem/operator-plugin-framework/go/internal/tunnel"
)

// ErrClosed is returned by Ready once the client is closed.
var ErrClosed = errors.New("plugin client closed")

// Client keeps a plugin registered with an operator: it dials, registers,
// serves the operator's calls, reconnects with backoff when a tunnel is
// lost, and at once when the operator asks it to go away. It keeps one
// tunnel to every replica of the operator (see the package documentation).
//
// A Client is a grpc.ServiceRegistrar, so generated registration functions
// take it as they take a *grpc.Server, and a controller-runtime Runnable:
//
//	c, err := client.NewPlugin("validator", target, "v1.0.0")
//	validatorv1.RegisterValidatorServiceServer(c, &validator{})
//	err = c.Start(ctx) // until ctx ends, then drains
type Client struct {
	name    string
	version string
	target  target.Target
	cfg     config
	disp    *tunnel.Dispatcher
	dial    []grpc.DialOption
	log     logr.Logger

	startOnce sync.Once
	started   chan struct{} // closed by Start
	closing   chan struct{}
	closeOnce sync.Once
	done      chan struct{}
	slotsWG   sync.WaitGroup // slot goroutines
	draining  sync.WaitGroup // tunnels finishing their calls after a GoAway

	reg        *pb.Register // built by Start, read-only afterwards
	resolveNow chan struct{}

	mu       sync.Mutex
	addrs    []string          // the target's addresses, as last resolved
	slots    map[int]*slot     // running slots by index
	replicas map[string]*claim // operator replica id → the tunnel holding it
	held     map[string]int    // address → tunnels holding it
	ready    chan struct{}     // closed while a tunnel is registered
	lastErr  error
}

var _ grpc.ServiceRegistrar = (*Client)(nil)

// New starts a plugin called name, version version, serving impl (which
// implements desc's handler interface) and any services given with
// WithService, through the operator at target, one of:
//
//	unix:///absolute/path
//	dns:///host:port, host:port or tcp://host:port (every address host resolves to)
//	ipv4:addr:port[,addr:port...], ipv6:[addr]:port[,...]
//
// New returns at once; the client connects in the background until ctx ends
// or Close is called, either of which drains it. Use Ready to wait for the
// registration. New fails on a target that could never work, and on
// services that cannot be served.
func New(ctx context.Context, name, target, version string, desc *grpc.ServiceDesc, impl any, opts ...Option) (*Client, error) {
	c, err := NewPlugin(name, target, version, opts...)
	if err != nil {
		return nil, err
	}
	if desc != nil {
		if err := c.disp.Register(desc, impl); err != nil {
			return nil, err
		}
	}
	if err := c.begin(); err != nil {
		return nil, err
	}
	context.AfterFunc(ctx, c.shutdown)
	return c, nil
}

// NewPlugin returns a plugin that serves nothing yet: register services on
// it as on a grpc.Server (or with WithService), then call Start. The
// arguments and options are New's.
func NewPlugin(name, target, version string, opts ...Option) (*Client, error) {
	cfg := defaultConfig()
	for _, o := range opts {
		o.apply(&cfg)
	}
	tg, err := parseTarget(target)
	if err != nil {
		return nil, err
	}
	if err := checkName(name, version, cfg.labels); err != nil {
		return nil, err
	}
	if err := cfg.settings.Validate(); err != nil {
		return nil, fmt.Errorf("plugin client: %w", err)
	}
	log := cfg.logger.WithValues("plugin", name)
	c := &Client{
		name:       name,
		version:    version,
		target:     tg,
		cfg:        cfg,
		disp:       tunnel.NewDispatcher(log, cfg.unary, cfg.stream),
		log:        log,
		started:    make(chan struct{}),
		closing:    make(chan struct{}),
		done:       make(chan struct{}),
		resolveNow: make(chan struct{}, 1),
		slots:      map[int]*slot{},
		replicas:   map[string]*claim{},
		held:       map[string]int{},
		ready:      make(chan struct{}),
	}
	for _, s := range cfg.services {
		if err := c.disp.Register(s.desc, s.impl); err != nil {
			return nil, err
		}
	}
	if err := cfg.security.apply(&cfg, tg); err != nil { // credentials.go
		return nil, fmt.Errorf("plugin client: %w", err)
	}
	c.cfg = cfg
	c.dial = c.dialOptions()
	return c, nil
}

// parseTarget validates a target, accepting the unix: forms gRPC's own
// resolver knows only when their path is absolute.
func parseTarget(s string) (target.Target, error) {
	t, err := target.Parse(s)
	if err != nil {
		return target.Target{}, fmt.Errorf("plugin client: %w", err)
	}
	return t, nil
}

// checkName checks the registration rules of docs/tunnel-spec.md 4.4 that
// the plugin controls, so that a registration the operator must refuse
// fails here instead of in a retry loop.
func checkName(name, version string, labels map[string]string) error {
	switch {
	case name == "":
		return errors.New("plugin client: plugin name is empty")
	case len(name) > 253:
		return errors.New("plugin client: plugin name is longer than 253 characters")
	case len(version) > 128:
		return errors.New("plugin client: plugin version is longer than 128 bytes")
	case len(labels) > 32:
		return errors.New("plugin client: more than 32 labels")
	}
	for k, v := range labels {
		if k == "" || len(k) > 128 || len(v) > 256 {
			return fmt.Errorf("plugin client: invalid label %q: keys are 1 to 128 bytes, values at most 256", k)
		}
	}
	return nil
}

func (c *Client) dialOptions() []grpc.DialOption {
	creds := c.cfg.transportCreds
	if creds == nil {
		creds = insecure.NewCredentials()
	}
	local := c.cfg.settings.WithDefaults()
	opts := []grpc.DialOption{
		grpc.WithTransportCredentials(creds),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: c.cfg.backoff, MinConnectTimeout: c.cfg.handshakeTimeout}),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(local.MaxBatchSize), grpc.MaxCallSendMsgSize(1<<31-1)),
		experimental.WithBufferPool(tunnel.BufferPool),
	}
	if creds.Info().SecurityProtocol == "tls" {
		// crypto/tls buffers what it decrypts: gRPC's own 32 KiB read
		// buffer on top of it would copy every byte once more.
		opts = append(opts, grpc.WithReadBufferSize(0))
	}
	if c.target.Kind == target.DNS {
		// Each tunnel dials one address; TLS verifies the name dialled.
		opts = append(opts, grpc.WithAuthority(c.target.Host+":"+c.target.Port))
	}
	if c.cfg.perRPCCreds != nil {
		opts = append(opts, grpc.WithPerRPCCredentials(c.cfg.perRPCCreds))
	}
	return append(opts, c.cfg.dialOptions...)
}

// RegisterService implements grpc.ServiceRegistrar. Like grpc.Server it
// panics when called after Start, or with a desc and impl that do not fit.
func (c *Client) RegisterService(desc *grpc.ServiceDesc, impl any) {
	select {
	case <-c.started:
		panic(fmt.Sprintf("plugin client: RegisterService of %s after Start", desc.ServiceName))
	default:
	}
	c.disp.RegisterService(desc, impl)
}

// Start connects and serves until ctx ends, then drains, and returns. It
// implements controller-runtime's manager.Runnable, for a plugin that runs
// a manager of its own. It returns an error at once when the plugin serves
// no service or was started before, and nil after a clean drain.
func (c *Client) Start(ctx context.Context) error {
	if err := c.begin(); err != nil {
		return err
	}
	select {
	case <-ctx.Done():
		c.shutdown()
	case <-c.done:
	}
	<-c.done
	return nil
}

// NeedLeaderElection is false: a plugin serves whether or not its manager
// leads (controller-runtime's manager.LeaderElectionRunnable).
func (c *Client) NeedLeaderElection() bool { return false }

// begin starts the client's goroutines, once.
func (c *Client) begin() error {
	services := c.disp.Services()
	if len(services) == 0 {
		return errors.New("plugin client: no service to serve: register one before Start (or pass it to New)")
	}
	err := errors.New("plugin client: already started")
	c.startOnce.Do(func() {
		err = nil
		c.reg = &pb.Register{Name: c.name, Version: c.version, Services: services, Labels: c.cfg.labels}
		close(c.started)
		go c.run()
	})
	return err
}

// Ready waits until the plugin is registered with at least one operator
// replica. When ctx ends first it returns an error that includes the last
// connection failure.
func (c *Client) Ready(ctx context.Context) error {
	c.mu.Lock()
	ready := c.ready
	c.mu.Unlock()
	select {
	case <-ready:
		return nil
	case <-c.done:
		return ErrClosed
	case <-ctx.Done():
		c.mu.Lock()
		defer c.mu.Unlock()
		if c.lastErr != nil {
			return fmt.Errorf("plugin %q not registered: %w (last error: %v)", c.name, ctx.Err(), c.lastErr)
		}
		return fmt.Errorf("plugin %q not registered: %w", c.name, ctx.Err())
	}
}

// Registration describes one registered tunnel.
type Registration struct {
	// Address is the address the tunnel dialled.
	Address string
	// Replica is the operator replica's id, empty when the operator does
	// not say.
	Replica string
	// Instance is the id the operator gave the registration.
	Instance string
}

// Registrations lists the plugin's registered tunnels, one per operator
// replica, by slot.
func (c *Client) Registrations() []Registration {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []Registration
	for _, i := range slices.Sorted(maps.Keys(c.slots)) {
		if r := c.slots[i].registration; r != nil {
			out = append(out, *r)
		}
	}
	return out
}

// InstanceID is the id the operator gave one current registration (the
// first slot's), empty while not registered. Registrations lists them all.
func (c *Client) InstanceID() string {
	if rs := c.Registrations(); len(rs) > 0 {
		return rs[0].Instance
	}
	return ""
}

// Done is closed once the client has stopped.
func (c *Client) Done() <-chan struct{} { return c.done }

// Close drains the plugin: the operator is told to send no new calls, calls
// in flight get the drain timeout to finish, then the connections close.
// It is idempotent and returns once the client has stopped (at once if it
// never started).
func (c *Client) Close() error {
	c.shutdown()
	select {
	case <-c.started:
		<-c.done
	default:
	}
	return nil
}

func (c *Client) shutdown() {
	c.closeOnce.Do(func() { close(c.closing) })
}
