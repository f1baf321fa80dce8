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
// Handlers get what a gRPC server gives them: the caller's deadline and
// metadata in their context, which is cancelled when the caller cancels;
// grpc.SetHeader, grpc.SendHeader and grpc.SetTrailer; status errors with
// details passed back as they are. A panicking handler fails its call with
// INTERNAL. More services are served with WithService, and server
// interceptors run with WithUnaryInterceptor and WithStreamInterceptor.
//
// The client reconnects with exponential backoff and jitter when the
// tunnel is lost, and at once when the operator asks it to (while the old
// tunnel finishes its calls). When ctx ends or Close is called it drains:
// the operator sends no new calls, calls in flight get the drain timeout.
package client
