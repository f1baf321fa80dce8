package main

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/rest"
	"k8s.io/utils/ptr"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/config"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	"sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	pluginclient "github.com/guilhem/operator-plugin-framework/go/client"
	"github.com/guilhem/operator-plugin-framework/go/plugintest"
	"github.com/guilhem/operator-plugin-framework/go/server"

	demov1 "github.com/guilhem/operator-plugin-framework/examples/gen/demo/v1"
	"github.com/guilhem/operator-plugin-framework/examples/validator"
)

// startAPIServer starts envtest's real etcd and kube-apiserver for the
// test, or skips it when they have not been built.
func startAPIServer(t *testing.T) (*rest.Config, client.Client) {
	t.Helper()
	assets, err := findAssets()
	if err != nil {
		t.Skip(err)
	}
	log.SetLogger(zap.New(zap.WriteTo(testWriter{t}), zap.UseDevMode(true)))
	env := &envtest.Environment{BinaryAssetsDirectory: assets}
	cfg, err := env.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := env.Stop(); err != nil {
			t.Error(err)
		}
	})
	c, err := client.New(cfg, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	return cfg, c
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(string(b))
	return len(b), nil
}

// startManager runs a manager with the example's controller until the
// returned function is called, which waits for it to stop.
func startManager(t *testing.T, cfg *rest.Config, add func(ctrl.Manager) error) (stop func()) {
	t.Helper()
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{
		Metrics:                metricsserver.Options{BindAddress: "0"},
		HealthProbeBindAddress: "0",
		// Each test builds the same controller again.
		Controller: config.Controller{SkipNameValidation: ptr.To(true)},
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := add(mgr); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- mgr.Start(ctx) }()
	var stopped bool
	stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		if err := <-done; err != nil {
			t.Errorf("manager: %v", err)
		}
	}
	t.Cleanup(stop)
	return stop
}

// verdict polls the sample ConfigMap's verdict until it is set or the
// time is up.
func verdict(t *testing.T, c client.Client, within time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		var cm corev1.ConfigMap
		if err := c.Get(context.Background(), settings.NamespacedName, &cm); err != nil {
			t.Fatal(err)
		}
		if v := cm.Annotations[VerdictAnnotation]; v != "" || time.Now().After(deadline) {
			return v
		}
		time.Sleep(10 * time.Millisecond)
	}
}

const wantVerdict = "2 rule(s) broken: team-label no-default-namespace"

// The reconcile runs within a second of the plugin's registration, with
// no RequeueAfter: the registry's watch triggers it (package pluginsource).
func TestEnvtestReconcileOnRegistration(t *testing.T) {
	cfg, c := startAPIServer(t)
	op := plugintest.New(t)
	startManager(t, cfg, func(mgr ctrl.Manager) error { return setup(context.Background(), mgr, op.Registry()) })

	if err := c.Create(context.Background(), sample(map[string]string{PluginAnnotation: "validator"})); err != nil {
		t.Fatal(err)
	}
	if v := verdict(t, c, 500*time.Millisecond); v != "" {
		t.Fatalf("a verdict %q without the plugin", v)
	}
	registered := time.Now()
	op.StartPlugin("validator", &demov1.ValidatorService_ServiceDesc, &validator.Server{})
	if v := verdict(t, c, time.Second); v != wantVerdict {
		t.Fatalf("a second after the registration the verdict is %q, want %q", v, wantVerdict)
	}
	t.Logf("reconciled %v after the registration", time.Since(registered).Round(time.Millisecond))
}

// slowValidator holds each Validate call for a while and says when one
// has started.
type slowValidator struct {
	validator.Server
	started chan struct{}
}

func (s *slowValidator) Validate(ctx context.Context, req *demov1.ValidateRequest) (*demov1.ValidateResponse, error) {
	select {
	case s.started <- struct{}{}:
	default:
	}
	time.Sleep(time.Second)
	return s.Server.Validate(ctx, req)
}

// When the manager stops, it stops the plugin server (a runnable that
// needs no leader election) before the controllers: the server drains,
// and a call a reconcile has in flight finishes, within the drain
// timeout, with the reconcile context still alive (docs/operators.md).
func TestEnvtestShutdownLetsCallsInFlightFinish(t *testing.T) {
	cfg, c := startAPIServer(t)
	dir, err := os.MkdirTemp("", "opf")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	addr := "unix://" + filepath.Join(dir, "s.sock")
	srv, err := server.New(addr, server.WithDrainTimeout(10*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	stop := startManager(t, cfg, func(mgr ctrl.Manager) error {
		if err := mgr.Add(srv); err != nil {
			return err
		}
		return setup(context.Background(), mgr, srv.GetRegistry())
	})
	slow := &slowValidator{started: make(chan struct{}, 1)}
	plugin, err := pluginclient.New(context.Background(), "validator", addr, "v1", &demov1.ValidatorService_ServiceDesc, slow)
	if err != nil {
		t.Fatal(err)
	}
	defer plugin.Close()
	rctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := plugin.Ready(rctx); err != nil {
		t.Fatal(err)
	}

	if err := c.Create(context.Background(), sample(map[string]string{PluginAnnotation: "validator"})); err != nil {
		t.Fatal(err)
	}
	select {
	case <-slow.started:
	case <-time.After(10 * time.Second):
		t.Fatal("no call reached the plugin")
	}
	stop() // SIGTERM, as the manager sees it
	if v := verdict(t, c, 0); v != wantVerdict {
		t.Fatalf("after the shutdown the verdict is %q, want %q: the call in flight did not finish", v, wantVerdict)
	}
}
