// Command plugin is a validator plugin: it dials the operator, registers as
// "validator" and serves demo.v1.ValidatorService through the tunnel until
// it gets SIGTERM or SIGINT, then drains and exits.
//
//	go run ./plugin -target unix:///tmp/operator.sock
package main

import (
	"context"
	"flag"
	"log"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/go-logr/logr"

	"github.com/guilhem/operator-plugin-framework/go/client"

	demov1 "github.com/guilhem/operator-plugin-framework/examples/gen/demo/v1"
	"github.com/guilhem/operator-plugin-framework/examples/validator"
)

func main() {
	target := flag.String("target", getenv("OPF_TARGET", "unix:///var/run/plugins/operator.sock"),
		"the operator's address (env OPF_TARGET)")
	name := flag.String("name", getenv("OPF_PLUGIN_NAME", "validator"),
		"the name to register under (env OPF_PLUGIN_NAME)")
	flag.Parse()
	logger := logr.FromSlogHandler(slog.NewTextHandler(os.Stderr, nil))

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	c, err := client.New(ctx, *name, *target, "v1.0.0",
		&demov1.ValidatorService_ServiceDesc, &validator.Server{},
		client.WithLogger(logger))
	if err != nil {
		log.Fatal(err)
	}
	<-c.Done() // ctx ended: the calls in flight finished, the tunnel is closed
}

func getenv(key, fallback string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return fallback
}
