package server_test

import (
	"context"
	"fmt"
	"log"
	"os"
	"path/filepath"
	"time"

	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/guilhem/operator-plugin-framework/go/client"
	"github.com/guilhem/operator-plugin-framework/go/server"
)

// An operator serving plugins on a unix socket, and a plugin registering
// and answering a call through the tunnel. In an operator, the server is
// added to the controller-runtime manager with mgr.Add(srv) instead of
// being started by hand.
func ExampleNew() {
	dir, _ := os.MkdirTemp("", "example")
	defer os.RemoveAll(dir)
	addr := "unix://" + filepath.Join(dir, "plugins.sock")

	ctx, cancel := context.WithCancel(context.Background())
	srv, err := server.New(addr)
	if err != nil {
		log.Fatal(err)
	}
	stopped := make(chan error, 1)
	go func() { stopped <- srv.Start(ctx) }()
	defer func() { cancel(); <-stopped }()

	// The plugin, usually another process.
	plugin, err := client.New(ctx, "echo", addr, "v1.0.0", &testgrpc.TestService_ServiceDesc, &echo{})
	if err != nil {
		log.Fatal(err)
	}
	defer plugin.Close()

	wctx, cancelWait := context.WithTimeout(ctx, 10*time.Second)
	defer cancelWait()
	p, err := srv.GetRegistry().Wait(wctx, "echo")
	if err != nil {
		log.Fatal(err)
	}
	resp, err := testgrpc.NewTestServiceClient(p).UnaryCall(wctx, &testgrpc.SimpleRequest{ResponseSize: 3})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(resp.GetPayload().GetBody(), p.Instances()[0].Version)
	// Output: [0 1 2] v1.0.0
}

// echo serves one method of gRPC's interop TestService.
type echo struct {
	testgrpc.UnimplementedTestServiceServer
}

func (echo) UnaryCall(_ context.Context, in *testgrpc.SimpleRequest) (*testgrpc.SimpleResponse, error) {
	body := make([]byte, in.ResponseSize)
	for i := range body {
		body[i] = byte(i)
	}
	return &testgrpc.SimpleResponse{Payload: &testgrpc.Payload{Body: body}}, nil
}
