// Package sdkbench compares calls to another SDK's plugin through the
// tunnel with calls to the same servicer on that language's own gRPC server
// (grpc.aio, tonic), in the same run. The plugin is the SDK's conformance
// program: with OPF_CONFORMANCE_DIRECT_LISTEN it serves directly
// (docs/conformance.md). `go run mage.go bench` passes the commands:
//
//	go test -run ^$ -bench . ./sdkbench -args -sdk 'python=/venv/bin/python sdk/python/conformance_plugin.py'
//
// Each SDK's plugin is started once per mode for the whole run, and warmed
// before each benchmark.
//
// Without -sdk the benchmarks skip.
package sdkbench

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"sigs.k8s.io/controller-runtime/pkg/log"

	"github.com/guilhem/operator-plugin-framework/conformance"
	confv1 "github.com/guilhem/operator-plugin-framework/go/gen/conformance/v1"
	"github.com/guilhem/operator-plugin-framework/go/server"
)

// sdks is the -sdk flag: NAME=COMMAND, repeated.
type sdks []string

func (s *sdks) String() string     { return strings.Join(*s, ",") }
func (s *sdks) Set(v string) error { *s = append(*s, v); return nil }

var (
	sdkFlag     sdks
	tunnelFirst = flag.Bool("tunnel-first", false, "run each benchmark through the tunnel before the direct one (mage alternates it by round)")
)

func init() {
	flag.Var(&sdkFlag, "sdk", "NAME=COMMAND of an SDK's conformance plugin; repeated")
}

// paths holds, for the whole run, one started plugin per SDK and mode:
// testing calls a benchmark function several times while it sizes b.N,
// and a Python interpreter takes a second to start.
var (
	mu      sync.Mutex
	paths   = map[string]confv1.ConformanceServiceClient{}
	cleanup []func()
)

func TestMain(m *testing.M) {
	log.SetLogger(logr.Discard()) // the server logs through controller-runtime
	code := m.Run()
	for _, f := range slices.Backward(cleanup) {
		f()
	}
	os.Exit(code)
}

// each runs, for every SDK of -sdk, each benchmark through the tunnel and
// directly: BenchmarkSDK/<sdk>/<benchmark>/<path>, the names that
// go/internal/bench/report reads.
func each(b *testing.B, benches map[string]func(*testing.B, confv1.ConformanceServiceClient)) {
	if len(sdkFlag) == 0 {
		b.Skip("no -sdk NAME=COMMAND given")
	}
	names := slices.Sorted(maps.Keys(benches))
	for _, s := range sdkFlag {
		name, command, ok := strings.Cut(s, "=")
		if !ok {
			b.Fatalf("-sdk %q: want NAME=COMMAND", s)
		}
		argv, err := conformance.SplitCommand(command)
		if err != nil {
			b.Fatal(err)
		}
		modes := []string{"direct", "tunnel"}
		if *tunnelFirst {
			slices.Reverse(modes)
		}
		b.Run(name, func(b *testing.B) {
			for _, bench := range names {
				b.Run(bench, func(b *testing.B) {
					for _, mode := range modes {
						b.Run(mode, func(b *testing.B) {
							c, err := dial(name, mode, argv)
							if err != nil {
								b.Fatal(err)
							}
							warm(b, c)
							b.ResetTimer()
							benches[bench](b, c)
						})
					}
				})
			}
		})
	}
}

// dial returns the client of the SDK's plugin in mode, starting it once.
func dial(name, mode string, argv []string) (confv1.ConformanceServiceClient, error) {
	mu.Lock()
	defer mu.Unlock()
	key := name + "/" + mode
	if c, ok := paths[key]; ok {
		return c, nil
	}
	dir, err := os.MkdirTemp("", "opfsb")
	if err != nil {
		return nil, err
	}
	cleanup = append(cleanup, func() { os.RemoveAll(dir) })
	target := "unix://" + filepath.Join(dir, "s.sock")
	var c confv1.ConformanceServiceClient
	if mode == "direct" {
		c, err = direct(target, argv)
	} else {
		c, err = tunnelled(target, argv)
	}
	if err != nil {
		return nil, fmt.Errorf("%s: %w", key, err)
	}
	paths[key] = c
	return c, nil
}

// start runs the plugin with env added and stops it (SIGTERM, then
// SIGKILL) at the end of the run; it calls ready with its standard output.
// The plugin's logs are shown only if it fails to start.
func start(argv []string, env []string, ready func(*bufio.Scanner) error) (err error) {
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), env...)
	var logs strings.Builder
	cmd.Stderr = &logs
	defer func() {
		if err != nil {
			err = fmt.Errorf("%w; the plugin's logs:\n%s", err, logs.String())
		}
	}()
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return err
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	cleanup = append(cleanup, func() {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-done
		}
	})
	return ready(bufio.NewScanner(out))
}

// direct starts the plugin serving on its own language's gRPC server.
func direct(target string, argv []string) (confv1.ConformanceServiceClient, error) {
	err := start(argv, []string{"OPF_CONFORMANCE_DIRECT_LISTEN=" + target}, func(out *bufio.Scanner) error {
		for out.Scan() {
			if strings.TrimSpace(out.Text()) == "listening" {
				go func() {
					for out.Scan() {
					}
				}()
				return nil
			}
		}
		return fmt.Errorf("the plugin exited without printing \"listening\" (%v)", out.Err())
	})
	if err != nil {
		return nil, err
	}
	cc, err := grpc.NewClient(target, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, err
	}
	cleanup = append(cleanup, func() { cc.Close() })
	cc.Connect()
	return confv1.NewConformanceServiceClient(cc), nil
}

// tunnelled starts an operator on target and the plugin connected to it,
// and returns a client that calls the plugin through the registry.
func tunnelled(target string, argv []string) (confv1.ConformanceServiceClient, error) {
	srv, err := server.New(target)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		srv.Start(ctx)
	}()
	cleanup = append(cleanup, func() { cancel(); <-stopped })
	if _, err := srv.Addr(ctx); err != nil {
		return nil, err
	}
	env := []string{
		conformance.EnvTarget + "=" + target,
		conformance.EnvPluginName + "=bench",
		conformance.EnvPluginVersion + "=" + conformance.PluginVersion,
	}
	err = start(argv, env, func(out *bufio.Scanner) error {
		go func() {
			for out.Scan() {
			}
		}()
		return nil
	})
	if err != nil {
		return nil, err
	}
	wctx, wcancel := context.WithTimeout(ctx, 30*time.Second)
	defer wcancel()
	p, err := srv.GetRegistry().Wait(wctx, "bench")
	if err != nil {
		return nil, fmt.Errorf("the plugin did not register: %w", err)
	}
	return confv1.NewConformanceServiceClient(p), nil
}

// warm makes a few calls before the timer starts: connections, the
// interpreter's caches.
func warm(b *testing.B, c confv1.ConformanceServiceClient) {
	for range 50 {
		if _, err := c.Unary(context.Background(), &confv1.UnaryRequest{Payload: make([]byte, 64)}); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkSDK: sequential 64-byte calls (the payload is echoed), their
// rate and p50 latency; and a server stream of 1 MiB messages, which the
// plugin generates (the same work both ways).
func BenchmarkSDK(b *testing.B) {
	each(b, map[string]func(*testing.B, confv1.ConformanceServiceClient){
		"Unary64B":         unary64B,
		"ServerStream1MiB": serverStream1MiB,
	})
}

func unary64B(b *testing.B, c confv1.ConformanceServiceClient) {
	req := &confv1.UnaryRequest{Payload: make([]byte, 64)}
	lat := make([]time.Duration, 0, b.N)
	begin := time.Now()
	for range b.N {
		start := time.Now()
		if _, err := c.Unary(context.Background(), req); err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(start))
	}
	b.StopTimer()
	b.ReportMetric(float64(b.N)/time.Since(begin).Seconds(), "calls/s")
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Nanoseconds()), "p50-ns")
}

func serverStream1MiB(b *testing.B, c confv1.ConformanceServiceClient) {
	const size = 1 << 20
	b.SetBytes(size)
	stream, err := c.ServerStream(context.Background(), &confv1.ServerStreamRequest{
		Action: &confv1.Action{ResponseSize: size, ResponseCount: uint32(b.N)},
	})
	if err != nil {
		b.Fatal(err)
	}
	for i := range b.N {
		m, err := stream.Recv()
		if err != nil {
			b.Fatal(err)
		}
		if len(m.GetPayload()) != size || m.GetIndex() != uint32(i) {
			b.Fatalf("message %d: %d bytes, index %d", i, len(m.GetPayload()), m.GetIndex())
		}
	}
}
