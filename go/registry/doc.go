// Package registry records the plugins connected to an operator and hands
// out connections to them.
//
// A plugin registers under a name; several tunnels with one name are
// instances of the same plugin (replicas, or old and new versions during a
// rolling upgrade). Get, Plugin and Wait return a *PluginProvider, a
// grpc.ClientConnInterface that sends each call to the instance with the
// fewest calls in flight, the newest on a tie:
//
//	p, err := srv.GetRegistry().Get("validator")
//	if errors.Is(err, registry.ErrNotFound) {
//		// not connected (yet): requeue
//	}
//	resp, err := validatorv1.NewValidatorServiceClient(p).Validate(ctx, req)
//
// A provider stays valid across reconnections. While no instance is
// connected its calls fail with UNAVAILABLE, or wait for one when made with
// grpc.WaitForReady(true). Watch reports registrations and departures.
package registry
