package plugintest

import (
	"context"
	"errors"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/status"

	"github.com/guilhem/operator-plugin-framework/go/client"
)

// PluginOption configures a plugin started with StartPlugin.
type PluginOption interface {
	applyPlugin(*pluginConfig)
}

type pluginOptionFunc func(*pluginConfig)

func (f pluginOptionFunc) applyPlugin(c *pluginConfig) { f(c) }

type pluginConfig struct {
	version string
	client  []client.Option
}

// Version sets the version the plugin registers with. Default "v0.0.0-test".
func Version(v string) PluginOption {
	return pluginOptionFunc(func(c *pluginConfig) { c.version = v })
}

// Service serves one more service beside the one given to StartPlugin.
func Service(desc *grpc.ServiceDesc, impl any) PluginOption {
	return WithClientOptions(client.WithService(desc, impl))
}

// Labels sets the labels the plugin registers with.
func Labels(labels map[string]string) PluginOption {
	return WithClientOptions(client.WithLabels(labels))
}

// WithClientOptions passes options to client.New (interceptors, limits,
// ...).
func WithClientOptions(opts ...client.Option) PluginOption {
	return pluginOptionFunc(func(c *pluginConfig) { c.client = append(c.client, opts...) })
}

// Plugin is an in-process plugin, a real client.Client serving the
// implementation given to StartPlugin through the operator. Its methods
// simulate what real plugins do to operators: fail, answer slowly, leave.
type Plugin struct {
	op     *Operator
	name   string
	c      *client.Client
	cancel context.CancelFunc

	fail  atomic.Pointer[error]
	delay atomic.Int64 // time.Duration
	calls atomic.Int64

	mu     sync.Mutex
	killed bool
	conns  []net.Conn
	once   sync.Once
}

// StartPlugin starts a plugin called name serving impl, an implementation
// of desc's service (and those given with Service), and returns once the
// operator's registry lists it, so that a call made next reaches it. It
// stops at the test's cleanup, before the operator. Call it from the test's
// goroutine: it fails the test when the plugin does not register within 10
// seconds.
func (o *Operator) StartPlugin(name string, desc *grpc.ServiceDesc, impl any, opts ...PluginOption) *Plugin {
	o.t.Helper()
	cfg := pluginConfig{version: "v0.0.0-test"}
	for _, opt := range opts {
		opt.applyPlugin(&cfg)
	}
	ctx, cancel := context.WithCancel(context.Background())
	p := &Plugin{op: o, name: name, cancel: cancel}
	copts := append([]client.Option{
		client.WithLogger(o.log.WithValues("side", "plugin")),
		client.WithDialOptions(grpc.WithContextDialer(p.dial)),
		client.WithUnaryInterceptor(p.unary),
		client.WithStreamInterceptor(p.stream),
		// Reconnections in a test should be quick.
		client.WithBackoff(backoff.Config{BaseDelay: 10 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 200 * time.Millisecond}),
	}, cfg.client...)
	c, err := client.New(ctx, name, o.target, cfg.version, desc, impl, copts...)
	if err != nil {
		cancel()
		o.t.Fatalf("plugintest: plugin %q: %v", name, err)
	}
	p.c = c
	o.cleanups = append(o.cleanups, p.Stop)

	wctx, wcancel := context.WithTimeout(ctx, 10*time.Second)
	defer wcancel()
	if err := c.Ready(wctx); err != nil {
		p.Stop()
		o.t.Fatalf("plugintest: %v", err)
	}
	if !p.op.listed(c.InstanceID()) { // the server lists an instance before it answers it
		p.Stop()
		o.t.Fatalf("plugintest: plugin %q registered but the registry does not list it", name)
	}
	return p
}

// InstanceID is the id the operator gave the plugin's registration.
func (p *Plugin) InstanceID() string { return p.c.InstanceID() }

// Calls is how many calls reached the plugin (those that Fail made fail
// included).
func (p *Plugin) Calls() int { return int(p.calls.Load()) }

// Fail makes every call from now on fail with err, a status error such as
// status.Error(codes.Unavailable, "down"), before it reaches the
// implementation; Fail(nil) stops it. An error that is not a status reaches
// the caller as UNKNOWN, as from any gRPC server.
func (p *Plugin) Fail(err error) {
	if err == nil {
		p.fail.Store(nil)
		return
	}
	p.fail.Store(&err)
}

// Delay makes every call from now on wait d before it reaches the
// implementation (or fail with the caller's deadline or cancellation,
// which the plugin sees, if that comes first); Delay(0) stops it.
func (p *Plugin) Delay(d time.Duration) { p.delay.Store(int64(d)) }

// Stop drains the plugin as a plugin does on SIGTERM: the operator sends
// it no new call, the calls in flight finish, then it leaves. Stop returns
// once the registry no longer lists it. It is idempotent.
func (p *Plugin) Stop() {
	p.once.Do(func() {
		id := p.c.InstanceID()
		p.cancel()
		p.c.Close()
		p.waitGone(id)
	})
}

// Kill makes the plugin vanish as a crashed process does: its connection
// to the operator is lost at once, calls in flight fail with UNAVAILABLE,
// and it does not come back. Kill returns once the registry no longer
// lists it.
func (p *Plugin) Kill() {
	p.mu.Lock()
	p.killed = true
	conns := p.conns
	p.conns = nil
	p.mu.Unlock()
	id := p.c.InstanceID()
	for _, c := range conns {
		c.Close()
	}
	p.waitGone(id)
	p.Stop()
}

var errKilled = errors.New("plugintest: plugin killed")

func (p *Plugin) dial(ctx context.Context, _ string) (net.Conn, error) {
	p.mu.Lock()
	killed := p.killed
	p.mu.Unlock()
	if killed {
		return nil, errKilled
	}
	var conn net.Conn
	var err error
	if path, ok := strings.CutPrefix(p.op.target, "unix://"); ok {
		conn, err = (&net.Dialer{}).DialContext(ctx, "unix", path)
	} else {
		conn, err = p.op.dial(ctx)
	}
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.killed {
		conn.Close()
		return nil, errKilled
	}
	p.conns = append(p.conns, conn)
	return conn, nil
}

// hold applies Delay and Fail to a call.
func (p *Plugin) hold(ctx context.Context) error {
	p.calls.Add(1)
	if d := time.Duration(p.delay.Load()); d > 0 {
		timer := time.NewTimer(d)
		select {
		case <-timer.C:
		case <-ctx.Done():
			timer.Stop()
			return status.FromContextError(ctx.Err()).Err()
		}
	}
	if err := p.fail.Load(); err != nil {
		return *err
	}
	return nil
}

func (p *Plugin) unary(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if err := p.hold(ctx); err != nil {
		return nil, err
	}
	return handler(ctx, req)
}

func (p *Plugin) stream(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if err := p.hold(ss.Context()); err != nil {
		return err
	}
	return handler(srv, ss)
}

// waitListed waits until the registry lists the plugin's instance (the
// plugin may learn that it is registered before the registry lists it).
func (p *Plugin) waitGone(id string) {
	deadline := time.Now().Add(30 * time.Second)
	for id != "" && p.op.listed(id) && time.Now().Before(deadline) {
		time.Sleep(2 * time.Millisecond)
	}
}

func (o *Operator) listed(id string) bool {
	for _, in := range o.reg.List() {
		if in.ID == id {
			return true
		}
	}
	return false
}
