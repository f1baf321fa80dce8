// Command plugin is a validator plugin: it dials the operator, registers as
// "validator" and serves demo.v1.ValidatorService through the tunnel until
// it gets SIGTERM or SIGINT, then drains and exits. It takes the flags the
// manifests in config/ pass (config/plugin, config/sidecar):
//
//	go run ./plugin -operator unix:///tmp/operator.sock
//	plugin --operator=dns:///opf-plugin-server.opf-system.svc:8443 \
//		--token-file=/var/run/secrets/pluginframework/token \
//		--ca-file=/etc/plugin-server-ca/ca.crt --server-name=opf-plugin-server.opf-system.svc
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

// options are the command's flags.
type options struct {
	operator   string
	name       string
	tokenFile  string
	caFile     string
	serverName string
}

func bindFlags(fs *flag.FlagSet) *options {
	o := &options{}
	fs.StringVar(&o.operator, "operator", getenv("OPF_OPERATOR", "unix:///var/run/plugins/operator.sock"),
		"the operator's address: unix:///path, dns:///host:port or host:port (env OPF_OPERATOR)")
	fs.StringVar(&o.name, "name", getenv("OPF_PLUGIN_NAME", "validator"),
		"the name to register under (env OPF_PLUGIN_NAME)")
	fs.StringVar(&o.tokenFile, "token-file", "", "present the ServiceAccount token in this file (read at every connection)")
	fs.StringVar(&o.caFile, "ca-file", "", "verify the operator's certificate with this CA bundle (TLS)")
	fs.StringVar(&o.serverName, "server-name", "", "with -ca-file, the name the operator's certificate must hold (default: the target's host)")
	return o
}

// clientOptions turns the security flags into client options
// (docs/security.md).
func (o *options) clientOptions() []client.Option {
	var opts []client.Option
	if o.tokenFile != "" {
		opts = append(opts, client.WithTokenFile(o.tokenFile))
	}
	if o.caFile != "" {
		opts = append(opts, client.WithTLS(o.caFile, o.serverName))
	}
	return opts
}

func main() {
	o := bindFlags(flag.CommandLine)
	flag.Parse()
	logger := logr.FromSlogHandler(slog.NewTextHandler(os.Stderr, nil))

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	c, err := client.New(ctx, o.name, o.operator, "v1.0.0",
		&demov1.ValidatorService_ServiceDesc, &validator.Server{},
		append(o.clientOptions(), client.WithLogger(logger))...)
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
