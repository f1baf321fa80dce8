package client_test

import (
	"context"
	"log"
	"os"
	"os/signal"
	"syscall"

	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/guilhem/operator-plugin-framework/go/client"
)

// A plugin program: it serves its gRPC service through the operator until
// SIGTERM, then drains. In a pod it authenticates with its projected
// ServiceAccount token over TLS (docs/security.md).
func ExampleNew() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	c, err := client.New(ctx, "echo", "dns:///operator.operator-system.svc:9443", "v1.0.0",
		&testgrpc.TestService_ServiceDesc, &echo{},
		client.WithServiceAccountToken(),
		client.WithTLS("/var/run/operator-ca/ca.crt", "operator.operator-system.svc"),
		client.WithLabels(map[string]string{"pod": os.Getenv("POD_NAME")}),
	)
	if err != nil {
		log.Fatal(err)
	}
	<-c.Done() // SIGTERM: calls in flight finished, tunnel closed
}

// echo answers EmptyCall, one method of gRPC's interop TestService.
type echo struct {
	testgrpc.UnimplementedTestServiceServer
}

func (echo) EmptyCall(context.Context, *testgrpc.Empty) (*testgrpc.Empty, error) {
	return &testgrpc.Empty{}, nil
}
