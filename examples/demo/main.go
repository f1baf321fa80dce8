// Command demo runs the operator side of the framework in this process and
// a validator plugin as a separate process, on a unix socket and without a
// cluster, and has the operator call the plugin through the tunnel with
// every kind of RPC. It prints what is sent and received, then shuts both
// sides down gracefully.
//
//	go run ./demo    (or `go run mage.go demo` from the repository root)
//
// With -v it also prints the operator side's logs. It exits with status 1
// when any step fails.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/go-logr/logr"
	"sigs.k8s.io/controller-runtime/pkg/log"

	"github.com/guilhem/operator-plugin-framework/go/registry"
	"github.com/guilhem/operator-plugin-framework/go/server"

	demov1 "github.com/guilhem/operator-plugin-framework/examples/gen/demo/v1"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == pluginCommand {
		if err := runPlugin(os.Stdout); err != nil {
			fmt.Fprintln(os.Stderr, "plugin:", err)
			os.Exit(1)
		}
		return
	}
	verbose := flag.Bool("v", false, "also print the operator side's logs")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	err := run(ctx, os.Stdout, *verbose)
	cancel()
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "demo failed:", err)
		os.Exit(1)
	}
}

// run is the whole demo, printing to out; verbose adds the operator side's
// logs to what the registry tells.
func run(ctx context.Context, out io.Writer, verbose bool) error {
	start := time.Now()
	w := &syncWriter{w: out}
	dir, err := os.MkdirTemp("", "opf-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	target := "unix://" + filepath.Join(dir, "operator.sock")

	// The operator side: a server, as an operator's manager would run it.
	logger := logr.Discard()
	if verbose {
		logger = newLogger(w, "operator")
	}
	op, err := startOperator(ctx, target, logger)
	if err != nil {
		return err
	}
	defer op.stop()
	printf(w, "operator", "listening on %s", target)

	// The plugin side: another process, which dials the operator.
	plugin, err := startPlugin(target, w)
	if err != nil {
		return fmt.Errorf("starting the plugin: %w", err)
	}
	defer plugin.stop()
	printf(w, "demo", "started the plugin process (pid %d)", plugin.cmd.Process.Pid)

	// Until the shutdown, the plugin exiting is a failure.
	live, abort := context.WithCancelCause(ctx)
	defer abort(nil)
	go func() {
		select {
		case <-plugin.exited:
			abort(fmt.Errorf("the plugin process exited: %v", plugin.err))
		case <-live.Done():
		}
	}()

	wctx, cancel := context.WithTimeout(live, 10*time.Second)
	defer cancel()
	p, err := op.reg.Wait(wctx, pluginName)
	if err != nil {
		return fmt.Errorf("waiting for the plugin to register: %w", errors.Join(err, context.Cause(wctx)))
	}
	instances := p.Instances()
	if len(instances) != 1 {
		return fmt.Errorf("want 1 instance of %q, got %d", pluginName, len(instances))
	}
	inst := instances[0]
	// The plugin logs its side of the registration: let that line come
	// first, so that the output reads in order.
	select {
	case <-plugin.spoke:
	case <-time.After(time.Second):
	}
	printf(w, "operator", "registry: plugin %q connected, instance %s, version %s, services %v",
		inst.Name, inst.ID, inst.Version, inst.Services)

	// The calls: the generated client takes the registry's handle as it
	// would take a *grpc.ClientConn.
	calls := demov1.NewValidatorServiceClient(p)
	for _, step := range steps {
		if err := step.run(live, w, calls); err != nil {
			if cause := context.Cause(live); cause != nil {
				err = errors.Join(err, cause)
			}
			return fmt.Errorf("%s: %w", step.name, err)
		}
	}
	abort(nil)

	// The shutdown: the plugin drains on SIGTERM and leaves the registry,
	// then the operator drains.
	fmt.Fprintln(w, "\n== shutdown")
	wctx, cancel = context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	events := op.reg.Watch(wctx)
	printf(w, "demo", "sending SIGTERM to the plugin")
	if err := plugin.terminate(); err != nil {
		return err
	}
	if err := waitUnregistered(wctx, events, inst.ID); err != nil {
		return err
	}
	printf(w, "operator", "registry: instance %s left", inst.ID)
	if err := plugin.wait(10 * time.Second); err != nil {
		return fmt.Errorf("plugin process: %w", err)
	}
	printf(w, "demo", "the plugin process exited with status 0")
	printf(w, "demo", "stopping the operator")
	if err := op.stop(); err != nil {
		return fmt.Errorf("operator: %w", err)
	}
	printf(w, "operator", "stopped")
	printf(w, "demo", "done in %s", time.Since(start).Round(time.Millisecond))
	return nil
}

// operator is the operator side: a running server and its registry.
type operator struct {
	reg    *registry.Registry
	cancel context.CancelFunc
	served chan error
	once   sync.Once
	err    error
}

func startOperator(ctx context.Context, target string, logger logr.Logger) (*operator, error) {
	srv, err := server.New(target, server.WithDrainTimeout(5*time.Second))
	if err != nil {
		return nil, err
	}
	sctx, cancel := context.WithCancel(log.IntoContext(ctx, logger))
	op := &operator{reg: srv.GetRegistry(), cancel: cancel, served: make(chan error, 1)}
	go func() { op.served <- srv.Start(sctx) }()

	actx, cancelAddr := context.WithTimeout(ctx, 5*time.Second)
	defer cancelAddr()
	if _, err := srv.Addr(actx); err != nil {
		return nil, errors.Join(err, op.stop())
	}
	return op, nil
}

// stop cancels the server's context, which drains it, and returns what
// Start returned. It may be called more than once.
func (op *operator) stop() error {
	op.once.Do(func() {
		op.cancel()
		select {
		case op.err = <-op.served:
		case <-time.After(30 * time.Second):
			op.err = errors.New("the server did not stop")
		}
	})
	return op.err
}

// waitUnregistered reads registry events until instance id leaves.
func waitUnregistered(ctx context.Context, events <-chan registry.Event, id string) error {
	for ev := range events {
		if ev.Type == registry.Unregistered && ev.Instance.ID == id {
			return nil
		}
	}
	return fmt.Errorf("instance %s did not leave the registry: %w", id, ctx.Err())
}
