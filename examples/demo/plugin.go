package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/guilhem/operator-plugin-framework/go/client"

	demov1 "github.com/guilhem/operator-plugin-framework/examples/gen/demo/v1"
	"github.com/guilhem/operator-plugin-framework/examples/validator"
)

// The demo runs the plugin by starting its own binary again with the
// argument pluginCommand and the operator's address in targetEnv: faster
// and surer than building ../plugin first, and the same code.
const (
	pluginCommand = "plugin"
	targetEnv     = "OPF_TARGET"
	pluginName    = "validator"
	// The SDKs' demo plugins read these (sdk/python/examples,
	// sdk/rust/examples).
	sdkTargetEnv = "OPF_DEMO_TARGET"
	sdkNameEnv   = "OPF_DEMO_PLUGIN_NAME"
)

// runPlugin is the plugin process: it serves the validator through the
// operator at $OPF_TARGET until SIGTERM or SIGINT, then drains. It also
// stops when its standard input closes, so that it never outlives the demo.
func runPlugin(w io.Writer) error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		cancel(errors.New("standard input closed"))
	}()
	logger := newLogger(w, "plugin")

	c, err := client.New(ctx, pluginName, os.Getenv(targetEnv), "v1.0.0",
		&demov1.ValidatorService_ServiceDesc, &validator.Server{},
		client.WithLogger(logger))
	if err != nil {
		return err
	}
	<-ctx.Done()
	logger.Info("draining", "why", context.Cause(ctx))
	<-c.Done()
	logger.Info("stopped")
	return nil
}

// pluginProcess is a plugin as seen from the demo.
type pluginProcess struct {
	name   string // what it registers as
	cmd    *exec.Cmd
	spoke  chan struct{} // closed when the process first prints
	exited chan struct{} // closed when the process has exited
	err    error         // cmd.Wait's result, set before exited closes
}

// startPlugin starts the Go plugin process, its output going to w.
func startPlugin(target string, w io.Writer) (*pluginProcess, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	return startProcess(pluginName, []string{self, pluginCommand}, target, w)
}

// sdkPlugin is a plugin of another SDK the demo runs beside the Go one:
// its name and the command that starts it (sdk/python, sdk/rust).
type sdkPlugin struct {
	name string
	argv []string
}

// parseSDKPlugin reads -plugin NAME=["program","arg",...].
func parseSDKPlugin(s string) (sdkPlugin, error) {
	name, argv, ok := strings.Cut(s, "=")
	p := sdkPlugin{name: name}
	if !ok || name == "" || json.Unmarshal([]byte(argv), &p.argv) != nil || len(p.argv) == 0 {
		return p, fmt.Errorf("-plugin %q: want NAME=[\"program\",\"argument\",...]", s)
	}
	return p, nil
}

// startProcess starts a plugin process given the operator's address in
// targetEnv and sdkTargetEnv, its output going to w.
func startProcess(name string, argv []string, target string, w io.Writer) (*pluginProcess, error) {
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), targetEnv+"="+target, sdkTargetEnv+"="+target, sdkNameEnv+"="+name)
	p := &pluginProcess{name: name, cmd: cmd, spoke: make(chan struct{}), exited: make(chan struct{})}
	out := &firstWrite{w: w, done: p.spoke}
	// One writer for both: exec then writes from one goroutine at a time.
	cmd.Stdout, cmd.Stderr = out, out
	// The plugin stops when its standard input closes: at Wait, or when
	// this process ends, however it ends.
	if _, err := cmd.StdinPipe(); err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	go func() {
		p.err = cmd.Wait()
		close(p.exited)
	}()
	return p, nil
}

// terminate sends SIGTERM, on which the plugin drains and exits.
func (p *pluginProcess) terminate() error {
	return p.cmd.Process.Signal(syscall.SIGTERM)
}

// wait waits up to timeout for the process to exit and returns its error.
func (p *pluginProcess) wait(timeout time.Duration) error {
	select {
	case <-p.exited:
		return p.err
	case <-time.After(timeout):
		return errors.New("the plugin process did not exit in time")
	}
}

// stop ends the process if it still runs: SIGTERM, then SIGKILL after a
// grace period.
func (p *pluginProcess) stop() {
	select {
	case <-p.exited:
		return
	default:
	}
	_ = p.terminate()
	if p.wait(5*time.Second) != nil {
		_ = p.cmd.Process.Kill()
		<-p.exited
	}
}

// firstWrite passes writes on to w and closes done at the first one.
type firstWrite struct {
	w    io.Writer
	done chan struct{}
	once sync.Once
}

func (f *firstWrite) Write(p []byte) (int, error) {
	f.once.Do(func() { close(f.done) })
	return f.w.Write(p)
}
