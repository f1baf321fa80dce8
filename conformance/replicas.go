package conformance

import (
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
)

// Several operator replicas (spec 14.2-14.3, issue 12): the runner starts
// each replica on its own loopback address, all on one port
// (127.0.0.2:P, 127.0.0.3:P, ...), and gives the plugin one target that
// lists them (ipv4:127.0.0.2:P,127.0.0.3:P), or one address in front of
// them all (a round-robin TCP forwarder, the load-balanced Service), plus
// aliases (forwarders to one replica) that make a target reach a replica
// twice.

// loopbackHost is the i-th loopback address the runner uses: 127.0.0.2 on.
func loopbackHost(i int) string { return "127.0.0." + strconv.Itoa(2+i) }

// listenLoopback listens on n loopback addresses that share one port.
func listenLoopback(n int) ([]net.Listener, int, error) {
	var lastErr error
	for range 20 {
		first, err := net.Listen("tcp", net.JoinHostPort(loopbackHost(0), "0"))
		if err != nil {
			return nil, 0, err
		}
		port := first.Addr().(*net.TCPAddr).Port
		lis := []net.Listener{first}
		for i := 1; i < n; i++ {
			l, err := net.Listen("tcp", net.JoinHostPort(loopbackHost(i), strconv.Itoa(port)))
			if err != nil {
				lastErr = err
				break
			}
			lis = append(lis, l)
		}
		if len(lis) == n {
			return lis, port, nil
		}
		for _, l := range lis {
			l.Close()
		}
	}
	return nil, 0, fmt.Errorf("no port free on %d loopback addresses: %w", n, lastErr)
}

// forwarder relays TCP connections to backends: each new connection goes
// to the next backend in turn (one backend: an alias of that replica).
type forwarder struct {
	lis      net.Listener
	backends []string
	logf     func(string, ...any)

	next  atomic.Int64
	count atomic.Int64 // connections accepted

	mu     sync.Mutex
	conns  []net.Conn
	closed bool
	wg     sync.WaitGroup
}

func startForwarder(lis net.Listener, backends []string, logf func(string, ...any)) *forwarder {
	f := &forwarder{lis: lis, backends: backends, logf: logf}
	f.wg.Add(1)
	go f.serve()
	return f
}

func (f *forwarder) addr() string { return f.lis.Addr().String() }

func (f *forwarder) serve() {
	defer f.wg.Done()
	for {
		c, err := f.lis.Accept()
		if err != nil {
			return
		}
		n := f.count.Add(1)
		backend := f.backends[int(f.next.Add(1)-1)%len(f.backends)]
		f.logf("forwarder %s: connection %d to %s", f.addr(), n, backend)
		b, err := net.Dial("tcp", backend)
		if err != nil {
			f.logf("forwarder %s: %v", f.addr(), err)
			c.Close()
			continue
		}
		if !f.track(c, b) {
			return
		}
		f.wg.Add(2)
		go f.pipe(c, b)
		go f.pipe(b, c)
	}
}

func (f *forwarder) track(cs ...net.Conn) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		for _, c := range cs {
			c.Close()
		}
		return false
	}
	f.conns = append(f.conns, cs...)
	return true
}

// pipe copies one direction; the end of either closes both, as a dead
// connection would.
func (f *forwarder) pipe(dst, src net.Conn) {
	defer f.wg.Done()
	_, _ = io.Copy(dst, src)
	dst.Close()
	src.Close()
}

func (f *forwarder) stop() {
	f.lis.Close()
	f.mu.Lock()
	f.closed = true
	conns := f.conns
	f.conns = nil
	f.mu.Unlock()
	for _, c := range conns {
		c.Close()
	}
	f.wg.Wait()
}

// replicaSet is the addresses of a case with several operators.
type replicaSet struct {
	port       int
	listeners  []net.Listener // one per replica, until its operator takes it
	addrs      []string       // host:port of each replica
	forwarders []*forwarder   // the aliases, then the balancer
	target     string         // what the plugin dials
}

// newReplicaSet listens for n replicas, starts the aliases (each a
// forwarder to the replica of that index) and, when balanced, a
// round-robin forwarder in front of all, which is then the target.
func newReplicaSet(n int, aliases []int, balanced bool, twice []int, logf func(string, ...any)) (*replicaSet, error) {
	extra := len(aliases)
	if balanced {
		extra++
	}
	lis, port, err := listenLoopback(n + extra)
	if err != nil {
		return nil, err
	}
	rs := &replicaSet{port: port, listeners: lis[:n]}
	for _, l := range lis[:n] {
		rs.addrs = append(rs.addrs, l.Addr().String())
	}
	targets := append([]string(nil), rs.addrs...)
	for i, a := range aliases {
		if a < 0 || a >= n {
			for _, l := range lis {
				l.Close()
			}
			return nil, fmt.Errorf("alias of replica %d: there are %d", a, n)
		}
		f := startForwarder(lis[n+i], []string{rs.addrs[a]}, logf)
		rs.forwarders = append(rs.forwarders, f)
		targets = append(targets, f.addr())
	}
	if balanced {
		f := startForwarder(lis[n+extra-1], rs.addrs, logf)
		rs.forwarders = append(rs.forwarders, f)
		targets = []string{f.addr()}
	}
	for _, i := range twice {
		if i < 0 || i >= n {
			rs.stop()
			return nil, fmt.Errorf("listed_twice: no replica %d", i)
		}
		targets = append(targets, rs.addrs[i])
	}
	rs.target = "ipv4:" + strings.Join(targets, ",")
	return rs, nil
}

// listener hands over replica i's listener, or listens again on its
// address (a restart).
func (rs *replicaSet) listener(i int) (net.Listener, error) {
	if l := rs.listeners[i]; l != nil {
		rs.listeners[i] = nil
		return l, nil
	}
	return net.Listen("tcp", rs.addrs[i])
}

func (rs *replicaSet) stop() {
	for _, f := range rs.forwarders {
		f.stop()
	}
	for _, l := range rs.listeners {
		if l != nil {
			l.Close()
		}
	}
}

// replicaIndex checks a step's replica index.
func (r *caseRun) replicaIndex(i int) error {
	n := max(len(r.ops), len(r.rawOps))
	if i < 0 || i >= n {
		return fmt.Errorf("no replica %d: the case runs %d", i, n)
	}
	return nil
}
