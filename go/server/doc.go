// Package server is the operator's side of the framework: it accepts the
// tunnels plugins open, records them in a registry, and drains them on
// shutdown.
//
// A Server is a controller-runtime Runnable that every replica runs
// (NeedLeaderElection is false), so plugins connected to a standby replica
// work too:
//
//	srv, err := server.New("unix:///var/run/operator/plugins.sock")
//	if err != nil {
//		return err
//	}
//	if err := mgr.Add(srv); err != nil {
//		return err
//	}
//	plugins := srv.GetRegistry() // hand it to reconcilers
//
// When the manager's context ends, Start tells every plugin to go away,
// gives calls in flight the drain timeout (WithDrainTimeout) to finish,
// closes the tunnels and returns.
//
// Plugins are identified by an Authenticator (WithAuthenticator) and their
// registrations accepted or refused by a RegistrationPolicy
// (WithRegistrationPolicy), both run again on every registered tunnel
// every minute (WithRevalidationInterval). A TCP address needs an
// authenticator (the auth package has two modes) unless
// WithInsecureNoAuthentication says otherwise.
//
// Everything a peer can make the server hold is bounded, with a default,
// an option and a metric on controller-runtime's registry: connections,
// tunnels that are not registered yet, streams per connection, header
// sizes, idle connections, batch sizes, registration fields; lines logged
// about peers are rate-limited. docs/security.md lists them ("Limits").
// The wire protocol is described in docs/tunnel-spec.md.
package server
