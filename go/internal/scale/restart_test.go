package scale_test

import (
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/guilhem/operator-plugin-framework/go/server"
)

// Target of issue 13: after an operator restart every plugin is registered
// again within this long.
const reregisterWithin = 10 * time.Second

// scaleOptions are what an operator serving n plugins on one unix socket
// must set. Every client of a unix socket is one peer: the default
// connection limits (1024 in all, 64 from one peer) would refuse most
// plugins for good, and the default limits on tunnels waiting to register
// (64 in all, 8 from one peer) let only 36 of 10,000 plugins back within
// 10 s here (256 waiting in line, the rest refused and backing
// off). OPF_SCALE_UNREGISTERED=total,perPeer sets those (default
// 1024,1024; "default": the server's).
func scaleOptions(t *testing.T, n int) []server.Option {
	opts := []server.Option{server.WithMaxConnections(n+n/10, n+n/10)}
	v := os.Getenv("OPF_SCALE_UNREGISTERED")
	switch v {
	case "default":
		t.Logf("limits on unregistered tunnels: the defaults")
		return opts
	case "":
		v = "1024,1024"
	}
	var total, per int
	if _, err := fmt.Sscanf(v, "%d,%d", &total, &per); err != nil {
		t.Fatalf("OPF_SCALE_UNREGISTERED=%q: want total,perPeer or default", v)
	}
	t.Logf("limits on unregistered tunnels: %d in all, %d per peer", total, per)
	return append(opts, server.WithMaxUnregisteredTunnels(total, per))
}

// TestRestartReconnect connects OPF_SCALE_PLUGINS plugins (default 10,000,
// in OPF_SCALE_PROCS child processes, default 4) to an operator, stops the
// operator, starts it again on the same socket after OPF_SCALE_GAP_MS
// (default 1000), and records how many plugins are registered every
// 100 ms until all are. It prints the curve and fails unless all are back
// within 10 s and none gave up. It runs only with OPF_SCALE=1 (go run
// mage.go scale).
func TestRestartReconnect(t *testing.T) {
	if os.Getenv("OPF_SCALE") == "" {
		t.Skip("set OPF_SCALE=1 (or run go run mage.go scale) to run the 10,000-plugin restart test")
	}
	n := envInt("OPF_SCALE_PLUGINS", 10000)
	procs := envInt("OPF_SCALE_PROCS", 4)
	gap := time.Duration(envInt("OPF_SCALE_GAP_MS", 1000)) * time.Millisecond
	if lim := fileLimit(); lim < uint64(n)+256 {
		t.Skipf("the operator needs a file descriptor per plugin: limit %d for %d plugins", lim, n)
	}
	addr := "unix://" + socket(t)
	opts := scaleOptions(t, n)

	op := startOperator(t, addr, opts...)
	start := time.Now()
	p := startPlugins(t, addr, n, procs)
	t.Logf("%d plugin clients started in %d processes in %v", n, procs, time.Since(start).Round(time.Millisecond))
	first := record(t, op, n, start, 60*time.Second)
	if first.all == 0 {
		t.Fatalf("first connection: %d of %d registered after 60 s", first.counts[len(first.counts)-1], n)
	}
	t.Logf("first connection: all %d registered %v after the clients started", n, first.all.Round(time.Millisecond))

	stopAt := time.Now()
	op.stop()
	t.Logf("operator stopped (drained %d tunnels) in %v; restarting it in %v", n, time.Since(stopAt).Round(time.Millisecond), gap)
	time.Sleep(gap)

	restart := time.Now()
	op = startOperator(t, addr, opts...)
	c := record(t, op, n, restart, 60*time.Second)
	t.Logf("after the restart (%v after the stop began):\n%s", restart.Sub(stopAt).Round(time.Millisecond), c)
	if c.all > reregisterWithin || c.all == 0 {
		t.Errorf("%d of %d plugins registered again within %v (all back after %v), want all", c.within(reregisterWithin), n, reregisterWithin, c.all.Round(time.Millisecond))
	}
	if gave := p.stop(t); gave != 0 {
		t.Errorf("%d plugins gave up", gave)
	}
}

// curve is how many plugins were registered at each 100 ms step.
type curve struct {
	step   time.Duration
	counts []int         // registered at the end of each step
	all    time.Duration // when all were registered; 0: never
}

// record polls op's registry every 100 ms from since until n plugins are
// registered or timeout has passed. A step holds the last count polled
// within it (a busy process may skip steps).
func record(t *testing.T, op *operator, n int, since time.Time, timeout time.Duration) curve {
	t.Helper()
	c := curve{step: 100 * time.Millisecond}
	tick := time.NewTicker(c.step)
	defer tick.Stop()
	for range tick.C {
		got := len(op.reg.List())
		at := time.Since(since)
		i := int(at / c.step)
		for len(c.counts) <= i {
			last := 0
			if len(c.counts) > 0 {
				last = c.counts[len(c.counts)-1]
			}
			c.counts = append(c.counts, last)
		}
		c.counts[i] = got
		if got >= n {
			c.all = at
			return c
		}
		if at > timeout {
			t.Logf("only %d of %d registered after %v:\n%s", got, n, timeout, c)
			return c
		}
	}
	return c
}

// within is how many were registered after d.
func (c curve) within(d time.Duration) int {
	i := min(int(d/c.step), len(c.counts)-1)
	if i < 0 {
		return 0
	}
	return c.counts[i]
}

// String prints the registrations of each step as a histogram, with the
// running total; steps with none are left out.
func (c curve) String() string {
	var b strings.Builder
	peak := 1
	prev := 0
	for _, k := range c.counts {
		peak = max(peak, k-prev)
		prev = k
	}
	prev = 0
	for i, k := range c.counts {
		d := k - prev
		prev = k
		if d == 0 {
			continue
		}
		// A count can fall: a tunnel lost after it registered.
		fmt.Fprintf(&b, "  %5.1fs %6d %6d %s\n", float64(i)*c.step.Seconds(), d, k, strings.Repeat("#", (max(d, 0)*50+peak-1)/peak))
	}
	if c.all > 0 {
		fmt.Fprintf(&b, "  all registered after %v", c.all.Round(time.Millisecond))
	} else {
		fmt.Fprintf(&b, "  not all registered")
	}
	return b.String()
}
