// Package registry records the plugins connected to an operator and hands
// out connections to them.
//
// A plugin registers under a name; several tunnels with one name are
// instances of the same plugin (replicas, or old and new versions during a
// rolling upgrade). Get, Plugin and Wait return a *PluginProvider, a
// grpc.ClientConnInterface that generated clients take as they take a
// *grpc.ClientConn:
//
//	p, err := srv.GetRegistry().Get("validator")
//	if errors.Is(err, registry.ErrNotFound) {
//		// not connected (yet): return, and let a registry source requeue
//	}
//	resp, err := validatorv1.NewValidatorServiceClient(p).Validate(ctx, req)
//
// # Routing
//
// Each call goes only to the instances whose registration listed the
// call's service, so that during a rolling upgrade a service that only the
// new version serves is called on the new version alone; among them, to
// the one that accepts calls with the fewest calls in flight, the newest on
// a tie. A provider stays valid across reconnections. When no instance
// suits a call it fails (docs/tunnel-spec.md 13):
//
//   - UNAVAILABLE `plugin "x" is not connected`, saying why the last
//     instance left when one did;
//   - UNAVAILABLE `plugin "x" is draining` while every suitable instance
//     drains;
//   - UNIMPLEMENTED `plugin "x" has no instance serving <service>`;
//   - UNAVAILABLE `plugin "x" has no instance with <filter>` when a filter
//     (WithVersion, WithLabels, WithFilter) keeps none.
//
// A call made with grpc.WaitForReady(true) waits for a suitable instance
// instead, until its deadline.
//
// # Options
//
// Options given to New apply to every provider of the registry; options
// given to Get, Plugin or Wait to that provider. They take what a
// *grpc.ClientConn takes: client interceptors (WithUnaryInterceptor,
// WithStreamInterceptor), stats handlers (WithStatsHandler, for example
// otelgrpc.NewClientHandler()) and default call options; and
// WithDefaultTimeout, a deadline for calls whose context has none, as a
// reconcile context has none. Hand the registry to the server with
// server.WithRegistry.
//
// # Reconcilers, tests and watches
//
// A reconciler should hold a Plugins (Get and Wait) rather than a
// *Registry, so that a test can give it a fake (NewProvider) or the real
// server of package plugintest. Watch reports registrations and
// departures; package pluginsource turns them into reconcile requests.
//
// # Metrics
//
// The registry serves, with controller-runtime's metrics,
// plugin_framework_instances{plugin} (deleted when a plugin's last
// instance leaves), plugin_framework_calls_total{plugin,method,code} and
// plugin_framework_call_duration_seconds{plugin,method}. Every call is
// counted once, when its caller sees its status; a stream whose context
// ends first (cancelled, or dropped unread with its context cancelled) is
// counted then, with the context's code.
package registry
