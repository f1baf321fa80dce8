package scale_test

import (
	"context"
	"os"
	"runtime"
	"runtime/pprof"
	"strings"
	"testing"
	"time"

	"github.com/guilhem/operator-plugin-framework/go/server"
)

// Targets of issue 13 for an idle registered tunnel, operator side.
const (
	maxHeapPerTunnel = 32 << 10
	// maxGoroutinesPerTunnel counts every goroutine the tunnel makes the
	// operator run, gRPC's own included.
	maxGoroutinesPerTunnel = 4
)

// TestIdleTunnelCost connects OPF_COST_PLUGINS (default 1000) plugins,
// from a child process, to one operator and measures what the operator
// holds per idle registered tunnel: heap in use after GC and goroutines,
// told apart by who started them. OPF_COST_HEAP_PROFILE=file writes the
// operator's heap profile.
//
// It runs twice: without authentication, and with an authenticator (which
// makes the server revalidate every registered tunnel from time to time).
func TestIdleTunnelCost(t *testing.T) {
	authenticated := func(context.Context) (server.Identity, error) {
		return server.Identity{User: "system:serviceaccount:plugins:echo"}, nil
	}
	t.Run("anonymous", func(t *testing.T) { idleTunnelCost(t) })
	t.Run("authenticated", func(t *testing.T) { idleTunnelCost(t, server.WithAuthenticator(authenticated)) })
}

func idleTunnelCost(t *testing.T, opts ...server.Option) {
	n := envInt("OPF_COST_PLUGINS", 1000)
	addr := "unix://" + socket(t)
	op := startOperator(t, addr, append([]server.Option{
		// One unix socket is one peer: the per-peer limits must allow
		// every plugin.
		server.WithMaxConnections(n+16, n+16),
		server.WithMaxUnregisteredTunnels(n, n),
	}, opts...)...)

	time.Sleep(100 * time.Millisecond) // let the server settle
	m0, g0 := heapAfterGC(), goroutinesByOwner()
	p := startPlugins(t, addr, n, 1)
	waitRegistered(t, op.reg, n, 30*time.Second)
	time.Sleep(time.Second) // idle: set-up done, first heartbeats sent
	m1, g1 := heapAfterGC(), goroutinesByOwner()
	if f := os.Getenv("OPF_COST_HEAP_PROFILE"); f != "" {
		writeHeapProfile(t, f)
	}

	per := func(a, b uint64) float64 { return (float64(b) - float64(a)) / float64(n) }
	heapInuse := per(m0.HeapInuse, m1.HeapInuse)
	heapAlloc := per(m0.HeapAlloc, m1.HeapAlloc)
	stack := per(m0.StackInuse, m1.StackInuse)
	gper := func(k string) float64 { return float64(g1[k]-g0[k]) / float64(n) }
	total := 0.0
	for _, k := range []string{ownerGRPC, ownerHandler, ownerFramework, ownerOther} {
		total += gper(k)
	}
	t.Logf("%d idle tunnels, per tunnel in the operator: heap in use %.1f KiB (live objects %.1f KiB), goroutine stacks %.1f KiB",
		n, heapInuse/1024, heapAlloc/1024, stack/1024)
	if os.Getenv("OPF_COST_DEBUG") != "" {
		for k := range g1 {
			t.Logf("%6.2f %s", gper(k), k)
		}
	}
	t.Logf("goroutines per tunnel: %.2f in all = %.2f gRPC transport + %.2f gRPC stream handler (running the framework) + %.2f started by the framework + %.2f other",
		total, gper(ownerGRPC), gper(ownerHandler), gper(ownerFramework), gper(ownerOther))

	if heapInuse > maxHeapPerTunnel {
		t.Errorf("an idle tunnel holds %.1f KiB of heap in the operator, want at most %d KiB", heapInuse/1024, maxHeapPerTunnel>>10)
	}
	if total > maxGoroutinesPerTunnel+0.05 {
		t.Errorf("an idle tunnel runs %.2f goroutines in the operator, want at most %d", total, maxGoroutinesPerTunnel)
	}
	if gave := p.stop(t); gave != 0 {
		t.Errorf("%d plugins gave up", gave)
	}
}

func heapAfterGC() runtime.MemStats {
	var m runtime.MemStats
	// Twice: pooled buffers survive one collection in sync.Pool's victim
	// cache.
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&m)
	return m
}

func writeHeapProfile(t *testing.T, name string) {
	f, err := os.Create(name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	runtime.GC()
	if err := pprof.Lookup("heap").WriteTo(f, 0); err != nil {
		t.Fatal(err)
	}
}

// Who a goroutine belongs to.
const (
	ownerGRPC      = "grpc"      // started by gRPC, runs only gRPC (transport reader, loopy writer, keepalive)
	ownerHandler   = "handler"   // started by gRPC for a stream, runs the framework's handler
	ownerFramework = "framework" // started by the framework
	ownerOther     = "other"
)

const module = "github.com/guilhem/operator-plugin-framework/go/"

// goroutinesByOwner counts the process's goroutines by owner, from their
// stacks: the "created by" line says who started one, the frames what it
// runs.
func goroutinesByOwner() map[string]int {
	buf := make([]byte, 64<<20)
	buf = buf[:runtime.Stack(buf, true)]
	counts := map[string]int{}
	for _, g := range strings.Split(string(buf), "\n\n") {
		creator := ""
		if i := strings.Index(g, "\ncreated by "); i >= 0 {
			creator = g[i+len("\ncreated by "):]
		}
		body := g
		if i := strings.Index(g, "\ncreated by "); i >= 0 {
			body = g[:i]
		}
		if os.Getenv("OPF_COST_DEBUG") != "" {
			if i := strings.Index(creator, " in goroutine"); i >= 0 {
				counts["created by "+creator[:i]]++
			}
		}
		switch {
		case strings.HasPrefix(creator, module):
			counts[ownerFramework]++
		case strings.HasPrefix(creator, "google.golang.org/grpc") && strings.Contains(body, "\n"+module+"server.(*Server).connect("):
			counts[ownerHandler]++
		case strings.HasPrefix(creator, "google.golang.org/grpc"):
			counts[ownerGRPC]++
		default:
			counts[ownerOther]++
		}
	}
	return counts
}
