package registry

import (
	"fmt"
	"maps"
	"slices"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/stats"
)

// Option configures the providers of a registry, as dial options configure
// a *grpc.ClientConn. Given to New, an option applies to every provider the
// registry hands out; given to Get, Plugin or Wait, to that provider only,
// after the registry's (interceptors and stats handlers are added after the
// registry's, filters narrow further, a timeout replaces the registry's).
type Option interface {
	apply(*config)
}

type optionFunc func(*config)

func (f optionFunc) apply(c *config) { f(c) }

type config struct {
	unary    []grpc.UnaryClientInterceptor
	stream   []grpc.StreamClientInterceptor
	stats    []stats.Handler
	callOpts []grpc.CallOption
	timeout  time.Duration
	filters  []filter
}

// filter keeps the instances a provider may call.
type filter struct {
	desc string // for error messages: `version "v2"`
	keep func(Instance) bool
}

// with returns a copy of c with opts applied; c is not changed.
func (c config) with(opts []Option) config {
	c.unary = slices.Clip(c.unary)
	c.stream = slices.Clip(c.stream)
	c.stats = slices.Clip(c.stats)
	c.callOpts = slices.Clip(c.callOpts)
	c.filters = slices.Clip(c.filters)
	for _, o := range opts {
		o.apply(&c)
	}
	return c
}

func (c *config) keep(in Instance) bool {
	for _, f := range c.filters {
		if !f.keep(in) {
			return false
		}
	}
	return true
}

// WithUnaryInterceptor adds client interceptors for unary calls, as
// grpc.WithChainUnaryInterceptor does: the first is the outermost. The
// *grpc.ClientConn an interceptor receives is nil (a tunnelled call has
// none); interceptors that only pass it on, as those of otelgrpc and
// go-grpc-middleware do, work unchanged.
func WithUnaryInterceptor(i ...grpc.UnaryClientInterceptor) Option {
	return optionFunc(func(c *config) { c.unary = append(c.unary, i...) })
}

// WithStreamInterceptor adds client interceptors for streaming calls, as
// grpc.WithChainStreamInterceptor does (the *grpc.ClientConn is nil here
// too).
func WithStreamInterceptor(i ...grpc.StreamClientInterceptor) Option {
	return optionFunc(func(c *config) { c.stream = append(c.stream, i...) })
}

// WithStatsHandler adds a stats handler, as grpc.WithStatsHandler does, for
// example otelgrpc.NewClientHandler(). It sees every call with its Begin and
// End, the headers, trailers and each message; there is no connection of
// its own (TagConn and HandleConn are never called), and payload lengths are
// the marshalled sizes of the messages.
func WithStatsHandler(h stats.Handler) Option {
	return optionFunc(func(c *config) { c.stats = append(c.stats, h) })
}

// WithDefaultCallOptions adds call options to every call, before the
// call's own (so that the call's own win), as grpc.WithDefaultCallOptions
// does. For example grpc.WaitForReady(true) makes every call wait for an
// instance instead of failing while none is connected.
func WithDefaultCallOptions(opts ...grpc.CallOption) Option {
	return optionFunc(func(c *config) { c.callOpts = append(c.callOpts, opts...) })
}

// WithDefaultTimeout bounds every call whose context has no deadline, such
// as a call made straight from a controller-runtime reconcile context. The
// deadline is set before the interceptors run, so they see it and a retry
// interceptor's attempts share it; it reaches the plugin's handler as any
// deadline does. Default: none (0), as on a *grpc.ClientConn.
func WithDefaultTimeout(d time.Duration) Option {
	return optionFunc(func(c *config) { c.timeout = d })
}

// WithVersion narrows a provider to the instances that registered version
// v. See WithFilter for what narrowing costs.
func WithVersion(v string) Option {
	return WithFilter(fmt.Sprintf("version %q", v), func(in Instance) bool { return in.Version == v })
}

// WithLabels narrows a provider to the instances whose registration labels
// include every key and value of labels. See WithFilter for what narrowing
// costs.
func WithLabels(labels map[string]string) Option {
	labels = maps.Clone(labels)
	return WithFilter(fmt.Sprintf("labels %v", labels), func(in Instance) bool {
		for k, v := range labels {
			if got, ok := in.Labels[k]; !ok || got != v {
				return false
			}
		}
		return true
	})
}

// WithFilter narrows a provider to the instances for which keep returns
// true; desc names the condition in errors ("plugin \"x\" has no instance
// with <desc>"). keep is called under the registry's lock, for every call:
// it must be quick and must not call the registry.
//
// Narrowing is rarely needed: every call already goes only to instances
// that registered its service, so a rolling upgrade that adds or renames a
// service needs no filter. Narrow when instances that serve the same
// service behave differently and the caller depends on the difference. The
// cost: only the matching instances take the calls (no load spread over
// the others), and when the last of them drains or leaves — a rollout that
// replaces the pinned version — calls fail with UNAVAILABLE, or wait with
// grpc.WaitForReady(true), although other instances could have served
// them.
func WithFilter(desc string, keep func(Instance) bool) Option {
	return optionFunc(func(c *config) { c.filters = append(c.filters, filter{desc: desc, keep: keep}) })
}
