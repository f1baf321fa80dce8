// Command operator is the operator side of the examples as it looks in a
// real operator: a controller-runtime manager runs the plugin server, and a
// reconciler asks the "validator" plugin about every ConfigMap. It needs a
// cluster; ../demo runs both sides without one.
package main

import (
	"context"
	"flag"
	"os"
	"time"

	corev1 "k8s.io/api/core/v1"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"

	"github.com/guilhem/operator-plugin-framework/go/registry"
	"github.com/guilhem/operator-plugin-framework/go/server"

	demov1 "github.com/guilhem/operator-plugin-framework/examples/gen/demo/v1"
)

func main() {
	addr := flag.String("plugin-address", "unix:///var/run/plugins/operator.sock",
		"where plugins connect: unix:///path, tcp://host:port or host:port")
	opts := zap.Options{}
	opts.BindFlags(flag.CommandLine)
	flag.Parse()
	ctrl.SetLogger(zap.New(zap.UseFlagOptions(&opts)))

	if err := run(*addr); err != nil {
		ctrl.Log.Error(err, "operator failed")
		os.Exit(1)
	}
}

func run(addr string) error {
	mgr, err := ctrl.NewManager(ctrl.GetConfigOrDie(), ctrl.Options{})
	if err != nil {
		return err
	}

	srv, err := server.New(addr)
	if err != nil {
		return err
	}
	if err := mgr.Add(srv); err != nil { // serves plugins while the manager runs
		return err
	}

	err = ctrl.NewControllerManagedBy(mgr).
		For(&corev1.ConfigMap{}).
		Complete(&ConfigMapValidator{Client: mgr.GetClient(), Plugins: srv.GetRegistry()})
	if err != nil {
		return err
	}
	return mgr.Start(ctrl.SetupSignalHandler())
}

// ConfigMapValidator asks the "validator" plugin about every ConfigMap.
type ConfigMapValidator struct {
	client.Client
	Plugins *registry.Registry
}

// Reconcile validates one ConfigMap through the plugin.
func (r *ConfigMapValidator) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	var cm corev1.ConfigMap
	if err := r.Get(ctx, req.NamespacedName, &cm); err != nil {
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}

	p, err := r.Plugins.Get("validator")
	if err != nil { // registry.ErrNotFound: no instance connected yet
		return ctrl.Result{RequeueAfter: 10 * time.Second}, nil
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second) // reaches the plugin
	defer cancel()
	resp, err := demov1.NewValidatorServiceClient(p).Validate(ctx, &demov1.ValidateRequest{
		Resource: &demov1.Resource{Kind: "ConfigMap", Namespace: cm.Namespace, Name: cm.Name, Labels: cm.Labels},
	})
	if err != nil {
		return ctrl.Result{}, err // a gRPC status, as from any gRPC server
	}

	for _, v := range resp.GetVerdict().GetViolations() {
		log.FromContext(ctx).Info("ConfigMap breaks a rule", "rule", v.GetRule(), "problem", v.GetMessage())
	}
	return ctrl.Result{}, nil
}
