package integration_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/guilhem/operator-plugin-framework/go/client"
	"github.com/guilhem/operator-plugin-framework/go/server"
)

// Tests of an operator that runs several replicas (docs/tunnel-spec.md
// 14.3): each replica is a server on its own loopback address, all on one
// port, as the pods behind a headless Service are; the plugin is given one
// DNS name that resolves to them.

// replicaSet is a set of operator replicas and the name resolution that
// lists them.
type replicaSet struct {
	t    *testing.T
	port int
	mu   sync.Mutex
	ips  []string // what the name resolves to
	ops  map[string]*operator
	// lis holds the port on every replica address until a replica takes
	// it: a port merely seen free on one address was taken on another by
	// the time a second replica bound it (a flaky "address already in use").
	lis map[string]net.Listener
}

// maxReplicas is how many addresses, 127.0.0.2 upwards, a set reserves.
const maxReplicas = 8

func newReplicaSet(t *testing.T) *replicaSet {
	for range 20 {
		if rs := tryReplicaSet(t); rs != nil {
			return rs
		}
	}
	t.Fatal("no port is free on all the replica addresses")
	return nil
}

// tryReplicaSet listens on one port on every replica address, or returns
// nil when the port is taken on one of them.
func tryReplicaSet(t *testing.T) *replicaSet {
	first, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		t.Fatal(err)
	}
	port := first.Addr().(*net.TCPAddr).Port
	rs := &replicaSet{t: t, port: port, ops: map[string]*operator{}, lis: map[string]net.Listener{"127.0.0.2": first}}
	for i := 3; i < 2+maxReplicas; i++ {
		ip := fmt.Sprintf("127.0.0.%d", i)
		lis, err := net.Listen("tcp", net.JoinHostPort(ip, fmt.Sprint(port)))
		if err != nil {
			rs.closeUnused()
			return nil
		}
		rs.lis[ip] = lis
	}
	t.Cleanup(rs.closeUnused)
	return rs
}

func (rs *replicaSet) closeUnused() {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	for ip, lis := range rs.lis {
		lis.Close()
		delete(rs.lis, ip)
	}
}

// take returns the listener of the set's port on ip: the reserved one,
// or a new one once that was taken and closed.
func (rs *replicaSet) take(ip string) net.Listener {
	rs.mu.Lock()
	lis, ok := rs.lis[ip]
	delete(rs.lis, ip)
	rs.mu.Unlock()
	if ok {
		return lis
	}
	lis, err := net.Listen("tcp", net.JoinHostPort(ip, fmt.Sprint(rs.port)))
	if err != nil {
		rs.t.Fatal(err)
	}
	return lis
}

// start runs a replica on ip and adds it to the name's addresses.
func (rs *replicaSet) start(ip string, opts ...server.Option) *operator {
	addr := net.JoinHostPort(ip, fmt.Sprint(rs.port))
	opts = append(opts, server.WithListener(rs.take(ip)))
	op := startOperatorOn(rs.t, addr, append([]server.Option{server.WithReplica("replica-"+ip, 0)}, opts...)...)
	rs.mu.Lock()
	defer rs.mu.Unlock()
	rs.ips = append(rs.ips, ip)
	rs.ops[ip] = op
	return op
}

// remove takes ip out of the name's addresses (its server keeps running).
func (rs *replicaSet) remove(ip string) {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	rs.ips = slices.DeleteFunc(rs.ips, func(s string) bool { return s == ip })
}

func (rs *replicaSet) lookup(_ context.Context, host string) ([]string, error) {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	if host != "operator.test" {
		return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
	}
	return slices.Clone(rs.ips), nil
}

func (rs *replicaSet) target() string { return fmt.Sprintf("dns:///operator.test:%d", rs.port) }

// plugin connects a plugin to every replica through the name.
func (rs *replicaSet) plugin(opts ...client.Option) *client.Client {
	rs.t.Helper()
	c, err := client.New(context.Background(), "echo", rs.target(), "v1.0.0", &testgrpc.TestService_ServiceDesc, &testService{},
		append([]client.Option{client.WithLookupHost(rs.lookup), client.WithBackoff(fastBackoff), client.WithDrainTimeout(2 * time.Second)}, opts...)...)
	if err != nil {
		rs.t.Fatal(err)
	}
	rs.t.Cleanup(func() { c.Close() })
	return c
}

// registered waits until each operator lists the plugin exactly want times.
func registered(t *testing.T, within time.Duration, want int, ops ...*operator) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		ok := true
		for _, op := range ops {
			if n := len(op.reg.Plugin("echo").Instances()); n != want {
				ok = false
			}
		}
		if ok {
			return
		}
		if time.Now().After(deadline) {
			for i, op := range ops {
				t.Errorf("replica %d lists %d instances, want %d", i, len(op.reg.Plugin("echo").Instances()), want)
			}
			t.FailNow()
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestReplicasEachGetThePlugin(t *testing.T) {
	for _, n := range []int{2, 3} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			rs := newReplicaSet(t)
			var ops []*operator
			for i := range n {
				ops = append(ops, rs.start(fmt.Sprintf("127.0.0.%d", 2+i)))
			}
			start := time.Now()
			c := rs.plugin()
			registered(t, time.Second, 1, ops...)
			t.Logf("%d replicas registered the plugin in %v", n, time.Since(start).Round(time.Millisecond))
			waitRegistrations(t, c, n)
			for _, op := range ops {
				if _, err := op.call(t, "echo").EmptyCall(ctxTimeout(t, 5*time.Second), &testgrpc.Empty{}); err != nil {
					t.Errorf("call through %s: %v", op.target, err)
				}
			}
		})
	}
}

// TestReplicaLossLosesNoCall: while every replica calls the plugin without
// pause, one replica crashes and another drains; the others' calls all
// succeed, and replacements get the plugin.
func TestReplicaLossLosesNoCall(t *testing.T) {
	rs := newReplicaSet(t)
	a := rs.start("127.0.0.2")
	b := rs.start("127.0.0.3")
	c := rs.start("127.0.0.4")
	rs.plugin(client.WithResolveInterval(100 * time.Millisecond))
	registered(t, time.Second, 1, a, b, c)

	var calls, failed atomic.Int64
	callers := func(op *operator, stop <-chan struct{}) *sync.WaitGroup {
		var wg sync.WaitGroup
		tc := op.call(t, "echo")
		for range 4 {
			wg.Go(func() {
				for {
					select {
					case <-stop:
						return
					default:
					}
					if _, err := tc.EmptyCall(ctxTimeout(t, 5*time.Second), &testgrpc.Empty{}); err != nil {
						failed.Add(1)
						t.Errorf("call through %s: %v", op.target, err)
					}
					calls.Add(1)
				}
			})
		}
		return &wg
	}
	stop := make(chan struct{})
	wb, wc := callers(b, stop), callers(c, stop)

	// a crashes: its address leaves the name (its pod is gone).
	rs.remove("127.0.0.2")
	a.stop()
	time.Sleep(300 * time.Millisecond)
	// b drains: the plugin's tunnel to c is untouched. b's address stays
	// under the name (DNS lags): the plugin must cope.
	before := c.reg.Plugin("echo").Instances()
	close(stop)
	wb.Wait()
	b.stop()
	wc.Wait()
	if after := c.reg.Plugin("echo").Instances(); len(after) != 1 || after[0].ID != before[0].ID {
		t.Errorf("replica c's instance changed while b drained: %v, then %v", before, after)
	}
	t.Logf("%d calls through the surviving replicas, %d failed", calls.Load(), failed.Load())

	// A replacement appears under the name and gets the plugin.
	d := rs.start("127.0.0.5")
	registered(t, 2*time.Second, 1, c, d)
}

// TestReplicaDuplicateAddress: two addresses that reach the same replica
// (a forwarder here) give it one tunnel: the second is closed by replica id.
func TestReplicaDuplicateAddress(t *testing.T) {
	rs := newReplicaSet(t)
	a := rs.start("127.0.0.2")
	forward(t, rs.take("127.0.0.3"), []string{a.target})
	rs.mu.Lock()
	rs.ips = append(rs.ips, "127.0.0.3")
	rs.mu.Unlock()
	c := rs.plugin()
	registered(t, time.Second, 1, a)
	time.Sleep(500 * time.Millisecond) // the duplicate slot keeps trying, and keeps being refused
	registered(t, 0, 1, a)
	waitRegistrations(t, c, 1)
}

// TestReplicasBehindOneAddress: one load-balanced address in front of three
// replicas that announce their count; the plugin keeps connecting until it
// holds all three.
func TestReplicasBehindOneAddress(t *testing.T) {
	var ops []*operator
	var backends []string
	for i := range 3 {
		op := startOperatorOn(t, "127.0.0.1:0", server.WithReplica(fmt.Sprintf("replica-%d", i), 3))
		addr, _ := op.srv.Addr(context.Background())
		ops = append(ops, op)
		backends = append(backends, addr.String())
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	lb := forward(t, lis, backends)
	c, err := client.New(context.Background(), "echo", lb, "v1.0.0", &testgrpc.TestService_ServiceDesc, &testService{},
		client.WithBackoff(fastBackoff))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	registered(t, 5*time.Second, 1, ops...)
	waitRegistrations(t, c, 3)
}

// waitRegistrations waits until the plugin reports n registrations (it
// learns of each a moment after the operator records it).
func waitRegistrations(t *testing.T, c *client.Client, n int) {
	t.Helper()
	deadline := time.Now().Add(time.Second)
	for len(c.Registrations()) != n {
		if time.Now().After(deadline) {
			t.Fatalf("the plugin reports registrations %v, want %d", c.Registrations(), n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// forward accepts TCP connections on lis and relays each to the next
// backend in turn, as a load balancer does. It returns the address it
// listens on.
func forward(t *testing.T, lis net.Listener, backends []string) string {
	t.Helper()
	var wg sync.WaitGroup
	var conns sync.Map
	t.Cleanup(func() {
		lis.Close()
		conns.Range(func(k, _ any) bool { k.(net.Conn).Close(); return true })
		wg.Wait()
	})
	wg.Go(func() {
		for n := 0; ; n++ {
			in, err := lis.Accept()
			if err != nil {
				return
			}
			out, err := net.Dial("tcp", backends[n%len(backends)])
			if err != nil {
				in.Close()
				continue
			}
			conns.Store(in, nil)
			conns.Store(out, nil)
			for _, p := range [][2]net.Conn{{in, out}, {out, in}} {
				wg.Go(func() {
					_, err := io.Copy(p[0], p[1])
					if err != nil && !errors.Is(err, net.ErrClosed) {
						t.Logf("forward: %v", err)
					}
					p[0].Close()
					p[1].Close()
				})
			}
		}
	})
	return lis.Addr().String()
}

// TestReplicaCost measures what the plugin's process pays per operator
// replica: tunnels, goroutines and heap, for 1, 2, 4 and 8 replicas. It
// reports numbers (go test -v); it asserts only the tunnel count.
func TestReplicaCost(t *testing.T) {
	rs := newReplicaSet(t)
	var ops []*operator
	heapAfterGC := func() uint64 {
		var m runtime.MemStats
		runtime.GC()
		runtime.GC()
		runtime.ReadMemStats(&m)
		return m.HeapAlloc
	}
	// The servers' own cost is counted before the plugin starts; what grows
	// after is the plugin's (and the servers' per-tunnel cost: reported too).
	for i := range 8 {
		ops = append(ops, rs.start(fmt.Sprintf("127.0.0.%d", 2+i)))
	}
	rs.mu.Lock()
	all := slices.Clone(rs.ips)
	rs.mu.Unlock()
	for _, n := range []int{1, 2, 4, 8} {
		rs.mu.Lock()
		rs.ips = slices.Clone(all[:n])
		rs.mu.Unlock()
		g0, h0 := runtime.NumGoroutine(), heapAfterGC()
		c := rs.plugin()
		waitRegistrations(t, c, n)
		time.Sleep(100 * time.Millisecond) // let connection set-up settle
		g1, h1 := runtime.NumGoroutine(), heapAfterGC()
		t.Logf("%d replicas: %d tunnels; plugin and operators together: %d goroutines (%.1f per replica), %.1f KiB heap (%.1f KiB per replica)",
			n, len(c.Registrations()), g1-g0, float64(g1-g0)/float64(n), float64(h1-h0)/1024, float64(h1-h0)/1024/float64(n))
		c.Close()
		registered(t, 5*time.Second, 0, ops[:n]...)
	}
}
