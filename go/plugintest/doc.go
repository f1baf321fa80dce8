// Package plugintest runs an operator's plugin server and in-process
// plugins for a test, so that code that calls plugins — a reconciler — is
// tested against the real thing, in a plain `go test` or an envtest suite,
// without a cluster, a process or a socket file.
//
// New starts a real server (package server) on an in-memory listener
// (grpc's bufconn), for one test; StartPlugin starts a real plugin
// (package client) serving any gRPC service implementation and returns
// once the registry lists it:
//
//	op := plugintest.New(t)
//	plugin := op.StartPlugin("validator", &demov1.ValidatorService_ServiceDesc, &validator.Server{})
//	r := &ConfigMapValidator{Client: k8sClient, Plugins: op.Registry()}
//
// The hard cases are one call away:
//
//   - no instance yet: do not start the plugin (or start it later in the
//     test): Get fails with registry.ErrNotFound, calls with UNAVAILABLE;
//   - a plugin that leaves: plugin.Stop() drains it as SIGTERM does (calls
//     in flight finish), plugin.Kill() loses its connection as a crash
//     does (calls in flight fail with UNAVAILABLE);
//   - a plugin that fails: plugin.Fail(status.Error(codes.Unavailable,
//     "down")) makes every call fail with that status until Fail(nil);
//   - a slow plugin: plugin.Delay(3*time.Second) makes every call wait
//     before the implementation runs, or end with the caller's deadline.
//
// Everything stops at the test's cleanup, plugins first. Logs go to the
// test's log (shown with -v or on failure).
//
// # Reconcilers and fakes
//
// A reconciler should hold a registry.Plugins, the two methods it calls
// (Get and Wait), rather than a *registry.Registry. Operator.Registry
// satisfies it; so does a hand-written fake that returns
// registry.NewProvider(name, conn) for any gRPC connection, or an error
// wrapping registry.ErrNotFound.
//
// # Sockets
//
// The in-memory listener needs no file. WithUnixSocket serves on a real
// unix socket instead (Operator.Target is its address, for a plugin in
// another process); it is made in os.TempDir() rather than t.TempDir(),
// whose paths can exceed the 107 bytes a unix socket path may have.
package plugintest
