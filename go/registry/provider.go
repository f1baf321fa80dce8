package registry

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// PluginProvider calls one plugin by name through whichever of its
// instances suits each call. It implements grpc.ClientConnInterface, so
// generated clients take it as they take a *grpc.ClientConn:
//
//	p, err := reg.Get("validator")
//	client := validatorv1.NewValidatorServiceClient(p)
//
// Each call goes to an instance that registered the call's service, among
// those the provider's filters keep, that accepts calls: the one with the
// fewest calls in flight, the newest on a tie. The provider's interceptors
// and stats handlers run around each call as on a *grpc.ClientConn.
type PluginProvider struct {
	name   string
	cfg    config
	r      *Registry                // nil for a provider from NewProvider
	direct grpc.ClientConnInterface // NewProvider's connection
}

var _ grpc.ClientConnInterface = (*PluginProvider)(nil)

// NewProvider returns a provider that sends every call of the plugin
// called name to cc, with opts' interceptors, stats handlers, call options
// and timeout (filters do not apply). It is for fakes: a Plugins whose Get
// returns NewProvider("validator", conn) lets a reconciler be tested
// against any gRPC connection, such as a *grpc.ClientConn to an in-memory
// server.
func NewProvider(name string, cc grpc.ClientConnInterface, opts ...Option) *PluginProvider {
	return &PluginProvider{name: name, cfg: config{}.with(opts), direct: cc}
}

// Name is the plugin's name.
func (p *PluginProvider) Name() string { return p.name }

// Instances lists the plugin's connected instances that the provider's
// filters keep, oldest first.
func (p *PluginProvider) Instances() []Instance {
	if p.r == nil {
		return nil
	}
	p.r.mu.Lock()
	defer p.r.mu.Unlock()
	var out []Instance
	for _, e := range p.r.byName[p.name] {
		if p.cfg.keep(e.Instance) {
			out = append(out, e.Instance)
		}
	}
	return out
}

// Invoke performs a unary call.
func (p *PluginProvider) Invoke(ctx context.Context, method string, args, reply any, opts ...grpc.CallOption) error {
	ctx, cancel := p.withTimeout(ctx)
	defer cancel()
	opts = p.callOptions(opts)
	if len(p.cfg.unary) == 0 {
		return p.invoke(ctx, method, args, reply, nil, opts...)
	}
	return chainUnary(p.cfg.unary, p.invoke)(ctx, method, args, reply, nil, opts...)
}

// NewStream opens a streaming call.
func (p *PluginProvider) NewStream(ctx context.Context, desc *grpc.StreamDesc, method string, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	ctx, cancel := p.withTimeout(ctx)
	opts = p.callOptions(opts)
	streamer := grpc.Streamer(p.newStream)
	if len(p.cfg.stream) > 0 {
		streamer = chainStream(p.cfg.stream, streamer)
	}
	cs, err := streamer(ctx, desc, nil, method, opts...)
	if err != nil {
		cancel()
		return nil, err
	}
	if p.cfg.timeout > 0 {
		// The timer is released when the call ends for its caller (or
		// fires); an interceptor's attempts all run under it.
		cs = &onEndStream{ClientStream: cs, desc: desc, onEnd: func(error) { cancel() }}
	}
	return cs, nil
}

// withTimeout applies the default timeout to a context without deadline.
func (p *PluginProvider) withTimeout(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok || p.cfg.timeout <= 0 {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, p.cfg.timeout)
}

func (p *PluginProvider) callOptions(opts []grpc.CallOption) []grpc.CallOption {
	if len(p.cfg.callOpts) == 0 {
		return opts
	}
	return append(slices.Clip(p.cfg.callOpts), opts...)
}

// invoke is the innermost unary invoker: one call, as stats handlers and
// metrics see it, sent to a suitable instance.
func (p *PluginProvider) invoke(ctx context.Context, method string, args, reply any, _ *grpc.ClientConn, opts ...grpc.CallOption) error {
	c := p.begin(ctx, method, unaryDesc, opts)
	c.outPayload(args)
	opts = c.captureMetadata(opts)
	err := p.route(c.ctx, method, opts, func(cc grpc.ClientConnInterface) error {
		return cc.Invoke(c.ctx, method, args, reply, opts...)
	})
	if err == nil {
		c.inHeader(nil)
		c.inPayload(reply)
	}
	c.end(err)
	return err
}

var unaryDesc = &grpc.StreamDesc{}

// newStream is the innermost streamer.
func (p *PluginProvider) newStream(ctx context.Context, desc *grpc.StreamDesc, _ *grpc.ClientConn, method string, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	c := p.begin(ctx, method, desc, opts)
	var cs grpc.ClientStream
	err := p.route(c.ctx, method, opts, func(cc grpc.ClientConnInterface) (err error) {
		cs, err = cc.NewStream(c.ctx, desc, method, opts...)
		return err
	})
	if err != nil {
		c.end(err)
		return nil, err
	}
	return c.stream(cs, desc), nil
}

// maxRefusals bounds how often one call is sent elsewhere after an
// instance refused it (each refusal comes from a different instance, which
// the registry no longer picks).
const maxRefusals = 8

// route sends a call to a suitable instance, and to another when the one
// chosen turned it away unsent.
func (p *PluginProvider) route(ctx context.Context, method string, opts []grpc.CallOption, send func(grpc.ClientConnInterface) error) error {
	svc := service(method)
	wait := waitForReady(opts)
	var err error
	for range maxRefusals {
		var cc grpc.ClientConnInterface
		if cc, err = p.pick(ctx, svc, wait); err != nil {
			return err
		}
		if err = send(cc); !errors.Is(err, ErrRefused) && !refusedByPlugin(err) {
			return err
		}
	}
	return err
}

// refusedByPlugin reports whether the plugin refused a call because it had
// begun to drain: such a call never reached a handler and may go to
// another instance (docs/tunnel-spec.md 12.1). Only a unary call gets it
// here: a stream learns of it after NewStream returned.
func refusedByPlugin(err error) bool {
	st, ok := status.FromError(err)
	return ok && st.Code() == codes.Unavailable && st.Message() == "tunnel is draining"
}

// service is the service part of a full method name, "/pkg.Svc/Method".
func service(method string) string {
	i := strings.LastIndexByte(method, '/')
	if i < 0 {
		return ""
	}
	return strings.TrimPrefix(method[:i], "/")
}

// pollInterval is how often a call waiting for an instance looks again:
// an instance that stops draining, or starts, is a registry change and
// wakes it at once, but the end of a Conn's drain is not.
const pollInterval = 50 * time.Millisecond

// pick chooses the instance for a call of service svc ("" for any). With
// wait it waits for one instead of failing, until ctx ends.
func (p *PluginProvider) pick(ctx context.Context, svc string, wait bool) (grpc.ClientConnInterface, error) {
	if p.direct != nil {
		return p.direct, nil
	}
	for {
		p.r.mu.Lock()
		cc, st := p.chooseLocked(svc)
		changed := p.r.changed
		p.r.mu.Unlock()
		if cc != nil {
			return cc, nil
		}
		if !wait {
			return nil, st.Err()
		}
		timer := time.NewTimer(pollInterval)
		select {
		case <-changed:
		case <-timer.C:
		case <-ctx.Done():
			timer.Stop()
			ce := status.FromContextError(ctx.Err())
			return nil, status.Errorf(ce.Code(), "%s while waiting for an instance: %s", ce.Message(), st.Message())
		}
		timer.Stop()
	}
}

// chooseLocked returns the instance for a call, or the status that says
// why there is none (docs/tunnel-spec.md 13). Caller holds p.r.mu.
func (p *PluginProvider) chooseLocked(svc string) (Conn, *status.Status) {
	list := p.r.byName[p.name]
	var best Conn
	bestLoad, kept, serving := 0, 0, 0
	for i := len(list) - 1; i >= 0; i-- { // newest first: it wins ties
		e := list[i]
		if !p.cfg.keep(e.Instance) {
			continue
		}
		kept++
		if svc != "" && !slices.Contains(e.Services, svc) {
			continue
		}
		serving++
		if !e.conn.Accepting() {
			continue
		}
		if n := e.conn.InFlight(); best == nil || n < bestLoad {
			best, bestLoad = e.conn, n
		}
	}
	switch {
	case best != nil:
		return best, nil
	case len(list) == 0:
		msg := fmt.Sprintf("plugin %q is not connected", p.name)
		if why := p.r.departed[p.name]; why != "" {
			msg += " (" + why + ")"
		}
		return nil, status.New(codes.Unavailable, msg)
	case kept == 0:
		return nil, status.Newf(codes.Unavailable, "plugin %q has no instance with %s", p.name, p.filterDesc())
	case serving == 0:
		return nil, status.Newf(codes.Unimplemented, "plugin %q has no instance serving %s", p.name, svc)
	}
	return nil, status.Newf(codes.Unavailable, "plugin %q is draining", p.name)
}

func (p *PluginProvider) filterDesc() string {
	descs := make([]string, len(p.cfg.filters))
	for i, f := range p.cfg.filters {
		descs[i] = f.desc
	}
	return strings.Join(descs, " and ")
}

func waitForReady(opts []grpc.CallOption) bool {
	wait := false
	for _, o := range opts {
		if ff, ok := o.(grpc.FailFastCallOption); ok {
			wait = !ff.FailFast
		}
	}
	return wait
}

// errorMessage is an error's status message, or its text.
func errorMessage(err error) string {
	if st, ok := status.FromError(err); ok {
		return st.Message()
	}
	return err.Error()
}

// chainUnary composes interceptors around invoker, the first outermost.
func chainUnary(is []grpc.UnaryClientInterceptor, invoker grpc.UnaryInvoker) grpc.UnaryInvoker {
	for i := len(is) - 1; i >= 0; i-- {
		next, ic := invoker, is[i]
		invoker = func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, opts ...grpc.CallOption) error {
			return ic(ctx, method, req, reply, cc, next, opts...)
		}
	}
	return invoker
}

// chainStream composes stream interceptors around streamer, the first
// outermost.
func chainStream(is []grpc.StreamClientInterceptor, streamer grpc.Streamer) grpc.Streamer {
	for i := len(is) - 1; i >= 0; i-- {
		next, ic := streamer, is[i]
		streamer = func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, opts ...grpc.CallOption) (grpc.ClientStream, error) {
			return ic(ctx, desc, cc, method, next, opts...)
		}
	}
	return streamer
}
