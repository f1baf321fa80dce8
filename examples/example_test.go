package examples_test

import (
	"context"
	"fmt"
	"log"
	"os"
	"path/filepath"
	"time"

	"github.com/guilhem/operator-plugin-framework/go/client"
	"github.com/guilhem/operator-plugin-framework/go/server"

	demov1 "github.com/guilhem/operator-plugin-framework/examples/gen/demo/v1"
	"github.com/guilhem/operator-plugin-framework/examples/validator"
)

// The operator side: serve plugins, find one in the registry, and call it
// with the generated client. Here the plugin runs in the same process.
func Example_operator() {
	addr, cleanup := socket()
	defer cleanup()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	srv, err := server.New(addr)
	if err != nil {
		log.Fatal(err)
	}
	stopped := make(chan error, 1)
	go func() { stopped <- srv.Start(ctx) }() // in an operator: mgr.Add(srv)
	defer func() { cancel(); <-stopped }()
	if _, err := srv.Addr(ctx); err != nil { // listening
		log.Fatal(err)
	}

	stopPlugin := startPlugin(addr)
	defer stopPlugin()

	wctx, cancelWait := context.WithTimeout(ctx, 10*time.Second)
	defer cancelWait()
	p, err := srv.GetRegistry().Wait(wctx, "validator")
	if err != nil {
		log.Fatal(err)
	}
	resp, err := demov1.NewValidatorServiceClient(p).Validate(ctx, &demov1.ValidateRequest{
		Resource: &demov1.Resource{Kind: "ConfigMap", Namespace: "default", Name: "settings"},
	})
	if err != nil {
		log.Fatal(err)
	}
	for _, v := range resp.GetVerdict().GetViolations() {
		fmt.Printf("%s: %s\n", v.GetRule(), v.GetMessage())
	}
	// Output:
	// team-label: no "team" label
	// no-default-namespace: in the default namespace
}

// The plugin side: serve a gRPC service through the operator, then drain
// when the context ends. Here the operator runs in the same process.
func Example_plugin() {
	addr, stopOperator := startOperator()
	defer stopOperator()

	ctx, cancel := context.WithCancel(context.Background()) // in a program: signal.NotifyContext
	defer cancel()
	c, err := client.New(ctx, "validator", addr, "v1.0.0",
		&demov1.ValidatorService_ServiceDesc, &validator.Server{})
	if err != nil {
		log.Fatal(err)
	}

	rctx, cancelReady := context.WithTimeout(ctx, 10*time.Second)
	defer cancelReady()
	if err := c.Ready(rctx); err != nil { // optional: wait for the registration
		log.Fatal(err)
	}
	fmt.Println("registered as", c.InstanceID())

	cancel()   // drain: calls in flight finish, then the tunnel closes
	<-c.Done() // stopped
	fmt.Println("stopped")
	// Output:
	// registered as validator-1
	// stopped
}

// socket returns the address of a unix socket in a fresh temporary
// directory, and a function that removes the directory.
func socket() (addr string, cleanup func()) {
	dir, err := os.MkdirTemp("", "opf-example-")
	if err != nil {
		log.Fatal(err)
	}
	return "unix://" + filepath.Join(dir, "operator.sock"), func() { os.RemoveAll(dir) }
}

// startPlugin runs the validator plugin in this process until the
// returned function is called.
func startPlugin(addr string) (stop func()) {
	c, err := client.New(context.Background(), "validator", addr, "v1.0.0",
		&demov1.ValidatorService_ServiceDesc, &validator.Server{})
	if err != nil {
		log.Fatal(err)
	}
	return func() { c.Close() }
}

// startOperator serves plugins in this process until the returned function
// is called.
func startOperator() (addr string, stop func()) {
	addr, cleanup := socket()
	srv, err := server.New(addr)
	if err != nil {
		log.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	stopped := make(chan error, 1)
	go func() { stopped <- srv.Start(ctx) }()
	if _, err := srv.Addr(ctx); err != nil {
		log.Fatal(err)
	}
	return addr, func() {
		cancel()
		if err := <-stopped; err != nil {
			log.Print(err)
		}
		cleanup()
	}
}
