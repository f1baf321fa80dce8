// Command operator is the operator side of the examples as it looks in a
// real operator: a controller-runtime manager runs the plugin server, and a
// reconciler asks a plugin about every ConfigMap that names one in its
// validate.example.com/plugin annotation, then writes the verdict into the
// validate.example.com/verdict annotation.
//
// It takes the flags the manifests in config/ pass (config/sidecar,
// config/builtin, config/kube-rbac-proxy). Without a cluster, -envtest runs
// it against a local kube-apiserver and etcd (docs/operators.md, "Run the
// example locally"):
//
//	go run mage.go k8s:binaries   # once, from the repository root
//	go run ./operator -envtest -plugin-server-address unix:///tmp/opf.sock
//	go run ./plugin -operator unix:///tmp/opf.sock
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	"github.com/guilhem/operator-plugin-framework/go/auth"
	"github.com/guilhem/operator-plugin-framework/go/health"
	"github.com/guilhem/operator-plugin-framework/go/server"
)

// options are the command's flags.
type options struct {
	pluginServerAddress string
	tlsCert, tlsKey     string
	tokenAudiences      string
	behindProxy         bool
	maxTunnelAge        time.Duration
	leaderElect         bool
	probeAddress        string
	metricsAddress      string
	envtest             bool
	envtestKubeconfig   string
	zap                 zap.Options
}

func bindFlags(fs *flag.FlagSet) *options {
	o := &options{}
	fs.StringVar(&o.pluginServerAddress, "plugin-server-address", "unix:///var/run/plugins/operator.sock",
		"where plugins connect: unix:///path, tcp://host:port or host:port")
	fs.StringVar(&o.tlsCert, "plugin-server-tls-cert", "", "serve plugins over TLS with this certificate (and -plugin-server-tls-key)")
	fs.StringVar(&o.tlsKey, "plugin-server-tls-key", "", "the key of -plugin-server-tls-cert")
	fs.StringVar(&o.tokenAudiences, "plugin-token-audience", "",
		"authenticate plugins by their ServiceAccount token for these audiences (comma-separated), with TokenReview and SubjectAccessReview")
	fs.BoolVar(&o.behindProxy, "plugin-server-behind-proxy", false,
		"trust the identity kube-rbac-proxy passes in headers (serve on loopback only)")
	fs.DurationVar(&o.maxTunnelAge, "plugin-max-tunnel-age", 0, "drain each tunnel after this long (0: never)")
	fs.BoolVar(&o.leaderElect, "leader-elect", false, "elect a leader among the replicas: only it reconciles; every replica serves plugins")
	fs.StringVar(&o.probeAddress, "health-probe-bind-address", ":8081", "where /healthz and /readyz are served (0 to disable)")
	fs.StringVar(&o.metricsAddress, "metrics-bind-address", "0", "where /metrics is served (0 to disable)")
	fs.BoolVar(&o.envtest, "envtest", false,
		"run against a local kube-apiserver and etcd from KUBEBUILDER_ASSETS or .cache/k8s/bin, with a sample ConfigMap")
	fs.StringVar(&o.envtestKubeconfig, "envtest-kubeconfig", "/tmp/opf-envtest.kubeconfig", "with -envtest, where to write a kubeconfig for kubectl")
	o.zap.BindFlags(fs)
	return o
}

func main() {
	o := bindFlags(flag.CommandLine)
	flag.Parse()
	ctrl.SetLogger(zap.New(zap.UseFlagOptions(&o.zap)))

	if err := run(ctrl.SetupSignalHandler(), o); err != nil {
		ctrl.Log.Error(err, "operator failed")
		os.Exit(1)
	}
}

func run(ctx context.Context, o *options) error {
	cfg, err := restConfig(ctx, o)
	if err != nil {
		return err
	}
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{
		LeaderElection:         o.leaderElect,
		LeaderElectionID:       "opf-example-operator",
		HealthProbeBindAddress: o.probeAddress,
		Metrics:                metricsserver.Options{BindAddress: o.metricsAddress},
	})
	if err != nil {
		return err
	}

	opts, err := o.serverOptions(cfg)
	if err != nil {
		return err
	}
	srv, err := server.New(o.pluginServerAddress, opts...)
	if err != nil {
		return err
	}
	if err := mgr.Add(srv); err != nil { // serves plugins while the manager runs
		return err
	}
	if err := mgr.AddHealthzCheck("plugin-server", health.Listening(srv)); err != nil {
		return err
	}
	if err := mgr.AddReadyzCheck("plugin-server", health.Listening(srv)); err != nil {
		return err
	}
	if err := setup(ctx, mgr, srv.GetRegistry()); err != nil {
		return err
	}
	return mgr.Start(ctx)
}

// serverOptions turns the security flags into server options
// (docs/security.md).
func (o *options) serverOptions(cfg *rest.Config) ([]server.Option, error) {
	var opts []server.Option
	switch {
	case o.behindProxy && o.tokenAudiences != "":
		return nil, errors.New("-plugin-server-behind-proxy and -plugin-token-audience exclude each other: the proxy checks the tokens")
	case o.behindProxy, o.tokenAudiences != "":
		kc, err := kubernetes.NewForConfig(cfg)
		if err != nil {
			return nil, err
		}
		if o.behindProxy {
			var proxy []auth.ProxyOption
			if v := os.Getenv("PLUGIN_PROXY_UID"); v != "" { // config/kube-rbac-proxy: the proxy's runAsUser
				uid, err := strconv.Atoi(v)
				if err != nil {
					return nil, fmt.Errorf("PLUGIN_PROXY_UID: %w", err)
				}
				proxy = append(proxy, auth.ProxyUID(uid))
			}
			opts, err = auth.BehindKubeRBACProxy(kc, proxy...)
		} else {
			opts, err = auth.BuiltIn(kc, strings.Split(o.tokenAudiences, ","))
		}
		if err != nil {
			return nil, err
		}
	}
	if (o.tlsCert == "") != (o.tlsKey == "") {
		return nil, errors.New("-plugin-server-tls-cert and -plugin-server-tls-key go together")
	}
	if o.tlsCert != "" {
		opts = append(opts, server.WithTLS(o.tlsCert, o.tlsKey))
	}
	if o.maxTunnelAge > 0 {
		opts = append(opts, server.WithMaxTunnelAge(o.maxTunnelAge))
	}
	// Every replica serves plugins: each says who it is, and how many there
	// are (config/operator sets both from the Deployment).
	if pod := os.Getenv("POD_NAME"); pod != "" {
		n, _ := strconv.Atoi(os.Getenv("OPERATOR_REPLICAS"))
		opts = append(opts, server.WithReplica(pod, n))
	}
	return opts, nil
}

// restConfig is the cluster's configuration, or a local API server's with
// -envtest.
func restConfig(ctx context.Context, o *options) (*rest.Config, error) {
	if o.envtest {
		return startEnvtest(ctx, o.envtestKubeconfig)
	}
	return ctrl.GetConfig()
}
