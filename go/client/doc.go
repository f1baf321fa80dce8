// Package client is the plugin's side of the framework: it dials the
// operator, registers, and serves the operator's calls with ordinary gRPC
// service implementations.
//
//	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
//	defer stop()
//	c, err := client.New(ctx, "validator", "unix:///var/run/operator/plugins.sock", "v1.2.0",
//		&validatorv1.ValidatorService_ServiceDesc, &myValidator{})
//	if err != nil {
//		log.Fatal(err)
//	}
//	<-c.Done()
//
// Or in the shape of a grpc.Server, with the generated registration
// functions, and Start as a controller-runtime Runnable:
//
//	c, err := client.NewPlugin("validator", target, "v1.2.0", client.WithServiceAccountToken())
//	validatorv1.RegisterValidatorServiceServer(c, &myValidator{})
//	err = c.Start(ctx) // serves until ctx ends, then drains
//
// Handlers get what a gRPC server gives them: the caller's deadline and
// metadata in their context, which is cancelled when the caller cancels;
// grpc.SetHeader, grpc.SendHeader and grpc.SetTrailer; status errors with
// details passed back as they are. A panicking handler fails its call with
// INTERNAL. More services are served with WithService, and server
// interceptors run with WithUnaryInterceptor and WithStreamInterceptor.
//
// # Operators with several replicas
//
// Every replica of an operator has its own registry, so the plugin keeps a
// tunnel to each (docs/tunnel-spec.md, 14.3). Give it a target that reaches
// them all: a headless Service's name ("dns:///operator-plugins.ns.svc:7443"
// resolves to every replica's address; the target is resolved again every
// 30 s and whenever a tunnel is lost), or one load-balanced address in
// front of replicas that announce their count (server.WithReplica), which
// the plugin dials until it holds that many distinct replicas. A tunnel
// that reaches a replica the plugin already holds is closed before it
// registers. Registrations lists the tunnels.
//
// # Reconnection and drain
//
// Each tunnel reconnects on its own with exponential backoff and jitter
// when it is lost, and at once when the operator asks it to (while the old
// tunnel finishes its calls). When ctx ends or Close is called the plugin
// drains: the operator sends no new calls, calls in flight get the drain
// timeout.
//
// # Importing it beside controller-runtime
//
// The name collides with controller-runtime's client package in operator
// code and tests; import one of them under another name:
//
//	import pluginclient "github.com/guilhem/operator-plugin-framework/go/client"
//
// A program that imports this package and not the operator's (server,
// registry, auth) compiles no Kubernetes package.
package client
