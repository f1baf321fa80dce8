// Package scale_test measures one operator with many plugins: what an idle
// registered tunnel costs the operator, and how fast thousands of plugins
// come back after the operator restarts.
//
// The plugins run in child processes (this test binary, started again
// with OPF_SCALE_CHILD set), so that the operator's heap and goroutines
// are counted alone, and so that neither process runs out of file
// descriptors: every plugin holds one unix socket, and so does the
// operator for each.
package scale_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/go-logr/logr"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"sigs.k8s.io/controller-runtime/pkg/log"

	"github.com/guilhem/operator-plugin-framework/go/client"
	"github.com/guilhem/operator-plugin-framework/go/internal/testservice"
	"github.com/guilhem/operator-plugin-framework/go/registry"
	"github.com/guilhem/operator-plugin-framework/go/server"
)

func TestMain(m *testing.M) {
	log.SetLogger(logr.Discard())
	slog.SetDefault(slog.New(slog.DiscardHandler))
	raiseFileLimit()
	if os.Getenv("OPF_SCALE_CHILD") != "" {
		os.Exit(runPlugins())
	}
	os.Exit(m.Run())
}

// raiseFileLimit lifts the soft limit on open files to the hard one.
func raiseFileLimit() {
	var l syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l); err != nil {
		return
	}
	l.Cur = l.Max
	_ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &l)
}

func fileLimit() uint64 {
	var l syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l); err != nil {
		return 0
	}
	return l.Cur
}

// runPlugins is a child process: OPF_SCALE_N plugins through
// OPF_SCALE_TARGET, until standard input closes. It prints "started" once
// every client is created, and on exit how many clients had stopped on
// their own (gave up): none ever should.
func runPlugins() int {
	n, err := strconv.Atoi(os.Getenv("OPF_SCALE_N"))
	if err != nil {
		fmt.Fprintln(os.Stderr, "OPF_SCALE_N:", err)
		return 2
	}
	target := os.Getenv("OPF_SCALE_TARGET")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	clients := make([]*client.Client, 0, n)
	for i := range n {
		c, err := client.New(ctx, "echo", target, "v1", &testgrpc.TestService_ServiceDesc, &testservice.Service{},
			client.WithLogger(logr.Discard()),
			client.WithLabels(map[string]string{"i": strconv.Itoa(i)}))
		if err != nil {
			fmt.Fprintln(os.Stderr, "client:", err)
			return 2
		}
		clients = append(clients, c)
	}
	fmt.Println("started")
	_, _ = io.Copy(io.Discard, os.Stdin) // until the parent closes it
	gaveUp := 0
	for _, c := range clients {
		select {
		case <-c.Done():
			gaveUp++
		default:
		}
	}
	fmt.Println("gave up", gaveUp)
	return 0
}

// plugins is a set of child processes running plugins.
type plugins struct {
	cmds  []*exec.Cmd
	stdin []io.WriteCloser
	out   []*bufio.Scanner
}

// startPlugins runs n plugins through target in procs child processes and
// waits until every client is created (not registered).
func startPlugins(t *testing.T, target string, n, procs int) *plugins {
	t.Helper()
	p := &plugins{}
	for i := range procs {
		k := n / procs
		if i < n%procs {
			k++
		}
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), "OPF_SCALE_CHILD=1", "OPF_SCALE_TARGET="+target, "OPF_SCALE_N="+strconv.Itoa(k))
		cmd.Stderr = os.Stderr
		in, err := cmd.StdinPipe()
		if err != nil {
			t.Fatal(err)
		}
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		p.cmds = append(p.cmds, cmd)
		p.stdin = append(p.stdin, in)
		p.out = append(p.out, bufio.NewScanner(out))
	}
	t.Cleanup(func() { p.stop(t) })
	for i, sc := range p.out {
		if !sc.Scan() || sc.Text() != "started" {
			t.Fatalf("plugin process %d did not start: %q %v", i, sc.Text(), sc.Err())
		}
	}
	return p
}

// stop ends the child processes and returns how many plugins gave up.
func (p *plugins) stop(t *testing.T) int {
	if p.cmds == nil {
		return 0
	}
	gaveUp := 0
	for i, in := range p.stdin {
		in.Close()
		if p.out[i].Scan() {
			if n, ok := strings.CutPrefix(p.out[i].Text(), "gave up "); ok {
				k, _ := strconv.Atoi(n)
				gaveUp += k
			}
		}
	}
	for _, cmd := range p.cmds {
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			_ = cmd.Process.Kill()
			<-done
			t.Errorf("plugin process %d did not stop in time: killed", cmd.Process.Pid)
		}
	}
	p.cmds = nil
	return gaveUp
}

// operator is a running server.
type operator struct {
	srv  *server.Server
	reg  *registry.Registry
	stop func()
}

func startOperator(t *testing.T, addr string, opts ...server.Option) *operator {
	t.Helper()
	reg := registry.New()
	srv, err := server.New(addr, append([]server.Option{server.WithRegistry(reg)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- srv.Start(ctx) }()
	actx, acancel := context.WithTimeout(ctx, 5*time.Second)
	defer acancel()
	if _, err := srv.Addr(actx); err != nil {
		t.Fatal(err)
	}
	op := &operator{srv: srv, reg: reg}
	var stopped bool
	op.stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		if err := <-errc; err != nil {
			t.Errorf("server: %v", err)
		}
	}
	t.Cleanup(op.stop)
	return op
}

// waitRegistered waits until reg lists n instances, or fails after within.
func waitRegistered(t *testing.T, reg *registry.Registry, n int, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		got := len(reg.List())
		if got == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d plugins registered after %v, want %d", got, within, n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func socket(t *testing.T) string {
	dir, err := os.MkdirTemp("", "opf-scale")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return filepath.Join(dir, "s.sock")
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}
