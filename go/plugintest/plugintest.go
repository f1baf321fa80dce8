package plugintest

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"
	"github.com/go-logr/logr/funcr"
	"google.golang.org/grpc/test/bufconn"

	"github.com/guilhem/operator-plugin-framework/go/internal/target"
	"github.com/guilhem/operator-plugin-framework/go/registry"
	"github.com/guilhem/operator-plugin-framework/go/server"
)

// T is the part of testing.TB the kit uses. *testing.T and *testing.B have
// it, and so has Ginkgo's GinkgoT().
type T interface {
	Helper()
	Cleanup(func())
	Fatalf(format string, args ...any)
	Logf(format string, args ...any)
}

// Option configures an Operator.
type Option interface {
	apply(*operatorConfig)
}

type optionFunc func(*operatorConfig)

func (f optionFunc) apply(c *operatorConfig) { f(c) }

type operatorConfig struct {
	server   []server.Option
	registry []registry.Option
	unix     bool
}

// WithServerOptions passes options to server.New (drain timeout,
// registration policy, ...).
func WithServerOptions(opts ...server.Option) Option {
	return optionFunc(func(c *operatorConfig) { c.server = append(c.server, opts...) })
}

// WithRegistryOptions passes options to registry.New: interceptors, stats
// handlers, a default timeout.
func WithRegistryOptions(opts ...registry.Option) Option {
	return optionFunc(func(c *operatorConfig) { c.registry = append(c.registry, opts...) })
}

// WithUnixSocket serves on a real unix socket instead of an in-memory
// listener, for tests that need one (a plugin in another process, for
// example: Operator.Target is its address). The socket lives in a new
// directory of os.TempDir(), not t.TempDir(), whose paths can be longer
// than the 107 bytes a socket path may have; if even that is too long (a
// long TMPDIR), New fails with an error that says so.
func WithUnixSocket() Option {
	return optionFunc(func(c *operatorConfig) { c.unix = true })
}

// Operator is a real plugin server (package server) running for one test,
// with its registry. Plugins started with StartPlugin connect to it through
// an in-memory listener by default.
type Operator struct {
	t        T
	srv      *server.Server
	reg      *registry.Registry
	lis      *bufconn.Listener // nil with WithUnixSocket
	target   string
	log      logr.Logger
	quiet    *atomic.Bool // set once the test is over: the log drops lines
	cleanups []func()     // the plugins', run before the server stops
}

// New starts an operator's plugin server for the test; it stops at the
// test's cleanup, after the plugins started on it. Its logs go to t.Logf.
func New(t T, opts ...Option) *Operator {
	t.Helper()
	var cfg operatorConfig
	for _, o := range opts {
		o.apply(&cfg)
	}
	quiet := new(atomic.Bool)
	lg := funcr.New(func(prefix, args string) {
		if !quiet.Load() {
			t.Logf("%s %s", prefix, args)
		}
	}, funcr.Options{})
	op := &Operator{t: t, reg: registry.New(cfg.registry...), log: lg, quiet: quiet}

	addr := "bufconn"
	sopts := append([]server.Option{server.WithRegistry(op.reg)}, cfg.server...)
	if cfg.unix {
		dir, err := os.MkdirTemp("", "opf")
		if err != nil {
			t.Fatalf("plugintest: %v", err)
		}
		addr = "unix://" + filepath.Join(dir, "plugins.sock")
		if _, _, err := target.ParseListen(addr); err != nil {
			os.RemoveAll(dir)
			t.Fatalf("plugintest: %v (set TMPDIR to a shorter directory)", err)
		}
		t.Cleanup(func() { os.RemoveAll(dir) })
		op.target = addr
	} else {
		op.lis = bufconn.Listen(1 << 20)
		sopts = append(sopts, server.WithListener(op.lis))
		// Any valid target: the plugins' dialer ignores it and dials the
		// in-memory listener.
		op.target = "127.0.0.1:1"
	}
	srv, err := server.New(addr, sopts...)
	if err != nil {
		t.Fatalf("plugintest: %v", err)
	}
	op.srv = srv

	ctx, cancel := context.WithCancel(logr.NewContext(context.Background(), lg))
	stopped := make(chan error, 1)
	go func() { stopped <- srv.Start(ctx) }()
	t.Cleanup(func() {
		for i := len(op.cleanups) - 1; i >= 0; i-- {
			op.cleanups[i]()
		}
		cancel()
		select {
		case err := <-stopped:
			if err != nil {
				t.Logf("plugintest: server: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Logf("plugintest: the server did not stop within 30s")
		}
		quiet.Store(true)
	})
	actx, acancel := context.WithTimeout(ctx, 10*time.Second)
	defer acancel()
	if _, err := srv.Addr(actx); err != nil {
		t.Fatalf("plugintest: server not listening: %v", err)
	}
	return op
}

// Registry is the operator's registry: what a reconciler is given (it
// implements registry.Plugins).
func (o *Operator) Registry() *registry.Registry { return o.reg }

// Server is the operator's server, for health checks and the like.
func (o *Operator) Server() *server.Server { return o.srv }

// Target is the address plugins dial: a unix socket with WithUnixSocket,
// otherwise a placeholder that only the kit's plugins can reach.
func (o *Operator) Target() string { return o.target }

// dial connects a plugin to the in-memory listener.
func (o *Operator) dial(ctx context.Context) (net.Conn, error) {
	if o.lis == nil {
		return nil, fmt.Errorf("plugintest: no in-memory listener")
	}
	return o.lis.DialContext(ctx)
}
