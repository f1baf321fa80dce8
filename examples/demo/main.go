// Command demo runs the operator side of the framework in this process and
// a validator plugin as a separate process, on a unix socket and without a
// cluster, and has the operator call the plugin through the tunnel with
// every kind of RPC. It prints what is sent and received, then shuts both
// sides down gracefully.
//
//	go run ./demo    (or `go run mage.go demo` from the repository root)
//
// With -v it also prints the operator side's logs. Each -plugin
// NAME=["program","arg",...] runs one more plugin process, which serves
// the same validator service under NAME and gets the same calls: `go run
// mage.go demo` adds the Python and Rust SDKs' plugins so. It exits with
// status 1 when any step fails.
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
	"strings"
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
	var sdks []sdkPlugin
	flag.Func("plugin", `one more plugin: NAME=["program","arg",...]`, func(s string) error {
		p, err := parseSDKPlugin(s)
		sdks = append(sdks, p)
		return err
	})
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	err := run(ctx, os.Stdout, *verbose, sdks...)
	cancel()
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "demo failed:", err)
		os.Exit(1)
	}
}

// run is the whole demo, printing to out; verbose adds the operator side's
// logs to what the registry tells. sdks are plugins of other SDKs, called
// as the Go one is.
func run(ctx context.Context, out io.Writer, verbose bool, sdks ...sdkPlugin) error {
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

	// The plugin side: other processes, which dial the operator.
	goPlugin, err := startPlugin(target, w)
	if err != nil {
		return fmt.Errorf("starting the plugin: %w", err)
	}
	plugins := []*pluginProcess{goPlugin}
	defer func() {
		for _, p := range plugins {
			p.stop()
		}
	}()
	printf(w, "demo", "started the plugin process (pid %d)", goPlugin.cmd.Process.Pid)
	for _, sdk := range sdks {
		p, err := startProcess(sdk.name, sdk.argv, target, w)
		if err != nil {
			return fmt.Errorf("starting the plugin %s: %w", sdk.name, err)
		}
		plugins = append(plugins, p)
		printf(w, "demo", "started the plugin process %s (pid %d): %s", sdk.name, p.cmd.Process.Pid, strings.Join(sdk.argv, " "))
	}

	// Until the shutdown, a plugin exiting is a failure.
	live, abort := context.WithCancelCause(ctx)
	defer abort(nil)
	for _, p := range plugins {
		go func() {
			select {
			case <-p.exited:
				abort(fmt.Errorf("the plugin process %s exited: %v", p.name, p.err))
			case <-live.Done():
			}
		}()
	}

	// Each plugin gets every call, in turn.
	instances := map[*pluginProcess]string{}
	for _, plugin := range plugins {
		id, err := callPlugin(live, w, op, plugin)
		if err != nil {
			if cause := context.Cause(live); cause != nil {
				err = errors.Join(err, cause)
			}
			return err
		}
		instances[plugin] = id
	}
	abort(nil)

	// The shutdown: each plugin drains on SIGTERM and leaves the registry,
	// then the operator drains.
	fmt.Fprintln(w, "\n== shutdown")
	wctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	events := op.reg.Watch(wctx)
	for _, plugin := range plugins {
		printf(w, "demo", "sending SIGTERM to the plugin %s", plugin.name)
		if err := plugin.terminate(); err != nil {
			return err
		}
		if err := waitUnregistered(wctx, events, instances[plugin]); err != nil {
			return err
		}
		printf(w, "operator", "registry: instance %s left", instances[plugin])
		if err := plugin.wait(10 * time.Second); err != nil {
			return fmt.Errorf("plugin process %s: %w", plugin.name, err)
		}
		printf(w, "demo", "the plugin process %s exited with status 0", plugin.name)
	}
	printf(w, "demo", "stopping the operator")
	if err := op.stop(); err != nil {
		return fmt.Errorf("operator: %w", err)
	}
	printf(w, "operator", "stopped")
	printf(w, "demo", "done in %s", time.Since(start).Round(time.Millisecond))
	return nil
}

// callPlugin waits for plugin to register and makes every call of the demo
// to it. It returns the instance's id.
func callPlugin(ctx context.Context, w io.Writer, op *operator, plugin *pluginProcess) (string, error) {
	wctx, cancel := context.WithTimeout(ctx, 60*time.Second) // an SDK's first start may take a while
	defer cancel()
	p, err := op.reg.Wait(wctx, plugin.name)
	if err != nil {
		return "", fmt.Errorf("waiting for the plugin %s to register: %w", plugin.name, errors.Join(err, context.Cause(wctx)))
	}
	instances := p.Instances()
	if len(instances) != 1 {
		return "", fmt.Errorf("want 1 instance of %q, got %d", plugin.name, len(instances))
	}
	inst := instances[0]
	// The plugin logs its side of the registration: let that line come
	// first, so that the output reads in order.
	select {
	case <-plugin.spoke:
	case <-time.After(time.Second):
	}
	fmt.Fprintf(w, "\n=== plugin %s\n", plugin.name)
	printf(w, "operator", "registry: plugin %q connected, instance %s, version %s, services %v",
		inst.Name, inst.ID, inst.Version, inst.Services)

	// The calls: the generated client takes the registry's handle as it
	// would take a *grpc.ClientConn.
	calls := demov1.NewValidatorServiceClient(p)
	for _, step := range steps {
		if err := step.run(ctx, w, calls); err != nil {
			return "", fmt.Errorf("%s: %s: %w", plugin.name, step.name, err)
		}
	}
	return inst.ID, nil
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
