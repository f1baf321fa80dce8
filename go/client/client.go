package client

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"time"

	"github.com/go-logr/logr"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	pb "github.com/guilhem/operator-plugin-framework/go/gen/pluginframework/v1"
	"github.com/guilhem/operator-plugin-framework/go/internal/tunnel"
)

// ErrClosed is returned by Ready once the client is closed.
var ErrClosed = errors.New("plugin client closed")

// Client keeps a plugin registered with an operator: it dials, registers,
// serves the operator's calls, reconnects with backoff when the tunnel is
// lost, and at once when the operator asks it to go away.
type Client struct {
	name string
	cfg  config
	disp *tunnel.Dispatcher
	cc   *grpc.ClientConn
	reg  *pb.Register
	log  logr.Logger

	closing   chan struct{}
	closeOnce sync.Once
	done      chan struct{}
	draining  sync.WaitGroup // tunnels finishing their calls after a GoAway

	mu       sync.Mutex
	instance string
	ready    chan struct{} // closed while registered
	lastErr  error
}

// New starts a plugin called name, version version, serving impl (which
// implements desc's handler interface) and any services given with
// WithService, through the operator at target: "unix:///path",
// "dns:///host:port", "tcp://host:port" or "host:port".
//
// New returns at once; the client connects in the background until ctx ends
// or Close is called, either of which drains it. Use Ready to wait for the
// registration.
func New(ctx context.Context, name, target, version string, desc *grpc.ServiceDesc, impl any, opts ...Option) (*Client, error) {
	cfg := defaultConfig()
	for _, o := range opts {
		o.apply(&cfg)
	}
	if name == "" {
		return nil, errors.New("plugin name is empty")
	}
	if err := cfg.settings.Validate(); err != nil {
		return nil, err
	}
	services := cfg.services
	if desc != nil {
		services = append([]service{{desc, impl}}, services...)
	}
	if len(services) == 0 {
		return nil, errors.New("no service to serve")
	}
	log := cfg.logger.WithValues("plugin", name)
	disp := tunnel.NewDispatcher(log, cfg.unary, cfg.stream)
	for _, s := range services {
		if err := disp.Register(s.desc, s.impl); err != nil {
			return nil, err
		}
	}

	if err := cfg.security.apply(&cfg, target); err != nil { // credentials.go
		return nil, fmt.Errorf("plugin client: %w", err)
	}
	creds := cfg.transportCreds
	if creds == nil {
		creds = insecure.NewCredentials()
	}
	local := cfg.settings.WithDefaults()
	dial := []grpc.DialOption{
		grpc.WithTransportCredentials(creds),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: cfg.backoff, MinConnectTimeout: cfg.handshakeTimeout}),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(local.MaxBatchSize), grpc.MaxCallSendMsgSize(1<<31-1)),
	}
	if cfg.perRPCCreds != nil {
		dial = append(dial, grpc.WithPerRPCCredentials(cfg.perRPCCreds))
	}
	cc, err := grpc.NewClient(grpcTarget(target), append(dial, cfg.dialOptions...)...)
	if err != nil {
		return nil, fmt.Errorf("plugin client: %w", err)
	}

	c := &Client{
		name: name,
		cfg:  cfg,
		disp: disp,
		cc:   cc,
		reg: &pb.Register{
			Name:     name,
			Version:  version,
			Services: disp.Services(),
			Labels:   cfg.labels,
		},
		log:     log,
		closing: make(chan struct{}),
		done:    make(chan struct{}),
		ready:   make(chan struct{}),
	}
	context.AfterFunc(ctx, func() { c.shutdown() })
	go c.run()
	return c, nil
}

// grpcTarget turns the framework's address forms into gRPC targets.
func grpcTarget(target string) string {
	if rest, ok := strings.CutPrefix(target, "tcp://"); ok {
		return "dns:///" + rest
	}
	return target
}

// Ready waits until the plugin is registered. When ctx ends first it
// returns an error that includes the last connection failure.
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

// InstanceID is the id the operator gave the current registration, empty
// while not registered.
func (c *Client) InstanceID() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.instance
}

// Done is closed once the client has stopped.
func (c *Client) Done() <-chan struct{} { return c.done }

// Close drains the plugin: the operator is told to send no new calls, calls
// in flight get the drain timeout to finish, then the connection closes.
// It is idempotent and returns once the client has stopped.
func (c *Client) Close() error {
	c.shutdown()
	<-c.done
	return nil
}

func (c *Client) shutdown() {
	c.closeOnce.Do(func() { close(c.closing) })
}

func (c *Client) run() {
	defer close(c.done)
	defer c.cc.Close()
	defer c.draining.Wait()
	attempt := 0
	for {
		registered, err := c.session()
		select {
		case <-c.closing:
			return
		default:
		}
		c.mu.Lock()
		c.lastErr = err
		c.mu.Unlock()
		if registered {
			attempt = 0
		}
		if errors.Is(err, errGoAway) {
			c.log.Info("operator asked to reconnect")
			continue // at once: the old tunnel still finishes its calls
		}
		delay := c.delay(attempt)
		attempt++
		c.log.Info("tunnel lost, reconnecting", "error", err, "in", delay.Round(time.Millisecond))
		timer := time.NewTimer(delay)
		select {
		case <-timer.C:
		case <-c.closing:
			timer.Stop()
			return
		}
	}
}

// delay is exponential backoff with jitter, as in gRPC's connection backoff.
func (c *Client) delay(attempt int) time.Duration {
	b := c.cfg.backoff
	d := float64(b.BaseDelay)
	for i := 0; i < attempt && d < float64(b.MaxDelay); i++ {
		d *= b.Multiplier
	}
	d = min(d, float64(b.MaxDelay))
	d *= 1 + b.Jitter*(rand.Float64()*2-1)
	return max(time.Duration(d), 0)
}

var (
	errGoAway                   = errors.New("operator sent GoAway")
	errGoAwayBeforeRegistration = errors.New("operator sent GoAway before answering the registration")
	errHandshakeTimeout         = errors.New("no answer to the registration before the handshake timeout")
)

// session runs one tunnel: connect, register, serve. It returns when the
// tunnel is lost, when the operator sends GoAway (the tunnel then finishes
// its calls in the background), or after draining it on Close.
func (c *Client) session() (registered bool, err error) {
	sctx, cancel := context.WithCancelCause(context.Background())
	handshake := time.AfterFunc(c.cfg.handshakeTimeout, func() { cancel(errHandshakeTimeout) })
	defer handshake.Stop()
	stream, err := pb.NewPluginFrameworkServiceClient(c.cc).Connect(sctx, grpc.ForceCodecV2(tunnel.WireCodec))
	if err != nil {
		cancel(nil)
		return false, err
	}
	goAway := make(chan struct{})
	var goAwayOnce sync.Once
	p, ok := peer.FromContext(stream.Context())
	if !ok {
		p = &peer.Peer{}
	}
	t := tunnel.New(tunnel.ClientTransport(stream), tunnel.Config{
		Side:     tunnel.PluginSide,
		Settings: c.cfg.settings,
		Register: c.reg,
		Handler:  c.disp,
		Peer:     p,
		Logger:   c.log,
		OnGoAway: func(*status.Status) { goAwayOnce.Do(func() { close(goAway) }) },
	})
	go func() {
		<-t.Done()
		cancel(nil) // ends the gRPC stream, which unblocks the read loop
	}()

	// The wait for the answer also ends on Close and on a GoAway: the
	// operator will not register this tunnel then.
	rctx, rcancel := context.WithCancelCause(sctx)
	go func() {
		select {
		case <-c.closing:
			rcancel(ErrClosed)
		case <-goAway:
			rcancel(errGoAway)
		case <-rctx.Done():
		}
	}()
	ack, err := t.Registered(rctx)
	rcancel(nil)
	if err != nil {
		if cause := context.Cause(rctx); errors.Is(cause, errHandshakeTimeout) || errors.Is(cause, ErrClosed) {
			err = cause
		} else if errors.Is(cause, errGoAway) {
			err = errGoAwayBeforeRegistration
		}
		t.Close(status.Convert(err))
		t.Wait()
		return false, err
	}
	handshake.Stop()
	c.setRegistered(t, ack.GetInstanceId())
	c.log.Info("registered", "instance", ack.GetInstanceId())
	defer c.setRegistered(nil, "")

	select {
	case <-t.Done():
		t.Wait()
		return true, t.Err()
	case <-goAway:
		c.draining.Add(1)
		go func() {
			defer c.draining.Done()
			<-t.Done()
			t.Wait()
		}()
		return true, errGoAway
	case <-c.closing:
		ctx, cancel := context.WithTimeout(context.Background(), c.cfg.drainTimeout)
		defer cancel()
		t.Drain(ctx, status.New(codes.Unavailable, "plugin shutting down"))
		t.Wait()
		return true, nil
	}
}

func (c *Client) setRegistered(t *tunnel.Tunnel, instance string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.instance = instance
	if t != nil {
		close(c.ready)
	} else {
		select {
		case <-c.ready:
			c.ready = make(chan struct{})
		default:
		}
	}
}
