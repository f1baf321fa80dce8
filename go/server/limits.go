package server

import (
	"context"
	"fmt"
	"net"
	"slices"
	"sync"
	"time"

	"github.com/go-logr/logr"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

// Bounds on what a peer can make the server hold, before and after it
// registers. docs/security.md ("Limits") lists each with its option,
// metric and what a peer sees when it is reached.
const (
	defaultMaxConnections         = 1024
	defaultMaxConnectionsPerPeer  = 64
	defaultMaxUnregistered        = 64
	defaultMaxUnregisteredPerPeer = 8
	defaultMaxStreamsPerConn      = 32
	defaultMaxHeaderListSize      = 16 << 10
	defaultConnectionIdle         = time.Minute
	// defaultConnectionTimeout bounds the TLS handshake and the HTTP/2
	// preface of a new connection (gRPC's default is 2 minutes).
	defaultConnectionTimeout = 10 * time.Second
	// defaultMaxBatchSize is the largest batch the server accepts from a
	// plugin (its Settings.max_batch_size, and gRPC's receive limit): what
	// any tunnel, registered or not, can make it hold while decoding. A
	// quarter of the protocol's 4 MiB default measured faster for large
	// responses, besides.
	defaultMaxBatchSize = 256 << 10
	// Keepalive pings from plugins more often than this end their
	// connection (gRPC's "too_many_pings"); gRPC's default is 5 minutes.
	minClientPing = 20 * time.Second
	// The server pings a connection silent this long, and closes it
	// without an answer after serverPingTimeout.
	serverPingTime    = time.Minute
	serverPingTimeout = 20 * time.Second
)

// limits is what the limit options set; zero fields take the defaults and
// negative ones disable the limit.
type limits struct {
	maxConns           int
	maxConnsPer        int
	maxUnregistered    int
	maxUnregisteredPer int
	maxStreamsPerConn  int
	maxHeaderListSize  int
	connIdle           time.Duration
	maxConnAge         time.Duration
	maxConnAgeGrace    time.Duration
}

func orDefault[T int | time.Duration](v, def T) T {
	if v == 0 {
		return def
	}
	return v
}

// grpcOptions are the gRPC server options the limits stand for. The
// user's own (WithGRPCServerOptions) come after and win.
func (l limits) grpcOptions() []grpc.ServerOption {
	var opts []grpc.ServerOption
	if n := orDefault(l.maxStreamsPerConn, defaultMaxStreamsPerConn); n > 0 {
		opts = append(opts, grpc.MaxConcurrentStreams(uint32(n)))
	}
	if n := orDefault(l.maxHeaderListSize, defaultMaxHeaderListSize); n > 0 {
		opts = append(opts, grpc.MaxHeaderListSize(uint32(n)))
	}
	kp := keepalive.ServerParameters{Time: serverPingTime, Timeout: serverPingTimeout}
	if d := orDefault(l.connIdle, defaultConnectionIdle); d > 0 {
		kp.MaxConnectionIdle = d
	}
	if l.maxConnAge > 0 {
		kp.MaxConnectionAge = l.maxConnAge
		kp.MaxConnectionAgeGrace = l.maxConnAgeGrace
	}
	return append(opts,
		grpc.KeepaliveParams(kp),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: minClientPing}),
		grpc.ConnectionTimeout(defaultConnectionTimeout),
	)
}

// limitListener closes, as soon as they are accepted, connections over
// its limits (in all, and from one IP address) and those check refuses,
// so that gRPC never spends a goroutine or a buffer on them.
type limitListener struct {
	net.Listener
	max, maxPer int // ≤ 0: no limit
	check       func(net.Conn) error
	log         logr.Logger

	mu     sync.Mutex
	total  int
	byPeer map[string]int
}

func newLimitListener(lis net.Listener, l limits, check func(net.Conn) error, lg logr.Logger) *limitListener {
	return &limitListener{
		Listener: lis,
		max:      orDefault(l.maxConns, defaultMaxConnections),
		maxPer:   orDefault(l.maxConnsPer, defaultMaxConnectionsPerPeer),
		check:    check,
		log:      lg,
		byPeer:   map[string]int{},
	}
}

func (l *limitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if l.check != nil {
			if err := l.check(c); err != nil {
				l.refuse(c, "peer", err.Error())
				continue
			}
		}
		key := peerKey(&peer.Peer{Addr: c.RemoteAddr()})
		l.mu.Lock()
		switch {
		case l.max > 0 && l.total >= l.max:
			l.mu.Unlock()
			l.refuse(c, "limit", fmt.Sprintf("limit of %d connections reached (WithMaxConnections)", l.max))
			continue
		case l.maxPer > 0 && l.byPeer[key] >= l.maxPer:
			l.mu.Unlock()
			l.refuse(c, "peer_limit", fmt.Sprintf("limit of %d connections from %s reached (WithMaxConnections)", l.maxPer, key))
			continue
		}
		l.total++
		l.byPeer[key]++
		l.mu.Unlock()
		connectionsGauge.Inc()
		return withReadOnReady(&countedConn{Conn: c, release: func() { l.release(key) }}), nil
	}
}

func (l *limitListener) refuse(c net.Conn, reason, why string) {
	connectionsRefused.WithLabelValues(reason).Inc()
	l.log.Info("connection refused", "peer", c.RemoteAddr().String(), "reason", why)
	c.Close()
}

func (l *limitListener) release(key string) {
	connectionsGauge.Dec()
	l.mu.Lock()
	defer l.mu.Unlock()
	l.total--
	if l.byPeer[key]--; l.byPeer[key] <= 0 {
		delete(l.byPeer, key)
	}
}

// countedConn gives its slot back once closed.
type countedConn struct {
	net.Conn
	once    sync.Once
	release func()
}

func (c *countedConn) Close() error {
	c.once.Do(c.release)
	return c.Conn.Close()
}

// admission counts the tunnels that are not registered yet, in all and by
// key: the peer's IP address until the tunnel is authenticated, then its
// user (so that tunnels a local proxy forwards for many plugins count per
// plugin identity, not all as one peer).
//
// A tunnel over a limit waits for a place, first come first served, for
// at most admissionWait, and only while fewer than maxWaiting tunnels
// wait; beyond either it is refused with RESOURCE_EXHAUSTED.
//
// Cost: after an operator restart every plugin reconnects at once. Refused
// at once, each would come back with a longer backoff and a new connection
// to set up: measured with 10,000 plugins on one socket, refusing at once
// let only 60 register again within 10 s, and made both sides spend their
// CPU on refused attempts. Waiting in line keeps the server registering
// at its own pace; a waiting tunnel holds only its stream and the
// goroutine gRPC gave it, nothing read yet, and so few wait (maxWaiting)
// that the limits still bound what a flood can make the server hold.
type admission struct {
	maxTotal, maxPer int // ≤ 0: no limit
	maxWaiting       int
	wait             time.Duration

	mu      sync.Mutex
	total   int
	byKey   map[string]int
	waiters []*waiter // in arrival order
}

// admissionWaitingFactor: up to this many times maxTotal tunnels wait
// for a place (with the default limits, 256).
const admissionWaitingFactor = 4

// maxAdmissionWait bounds how long a tunnel waits for a place, so that
// the plugin has time left to register within its own handshake timeout
// (10 s by default) once it has one.
const maxAdmissionWait = 5 * time.Second

// waiter is a tunnel waiting for a place under key; ready is closed once
// it has one (granted).
type waiter struct {
	key     string
	enter   bool // it needs a place in the total too
	ready   chan struct{}
	granted bool
}

func newAdmission(l limits, handshakeTimeout time.Duration) *admission {
	a := &admission{
		maxTotal: orDefault(l.maxUnregistered, defaultMaxUnregistered),
		maxPer:   orDefault(l.maxUnregisteredPer, defaultMaxUnregisteredPerPeer),
		wait:     min(handshakeTimeout/2, maxAdmissionWait),
		byKey:    map[string]int{},
	}
	a.maxWaiting = admissionWaitingFactor * max(a.maxTotal, a.maxPer, defaultMaxUnregistered)
	return a
}

// ticket is one unregistered tunnel's place.
type ticket struct {
	a    *admission
	key  string
	done bool
}

// fitsLocked reports whether a tunnel may take a place under key (and in
// the total, with enter). Caller holds a.mu.
func (a *admission) fitsLocked(key string, enter bool) bool {
	return (!enter || a.maxTotal <= 0 || a.total < a.maxTotal) && (a.maxPer <= 0 || a.byKey[key] < a.maxPer)
}

// takeLocked takes a place under key. Caller holds a.mu.
func (a *admission) takeLocked(key string, enter bool) {
	if enter {
		a.total++
		unregisteredGauge.Inc()
	}
	a.byKey[key]++
}

// acquire takes a place under key, waiting for one while ctx lasts and at
// most a.wait. It reports false when there is none.
func (a *admission) acquire(ctx context.Context, key string, enter bool) bool {
	a.mu.Lock()
	if a.fitsLocked(key, enter) {
		a.takeLocked(key, enter)
		a.mu.Unlock()
		return true
	}
	if len(a.waiters) >= a.maxWaiting || a.wait <= 0 {
		a.mu.Unlock()
		return false
	}
	w := &waiter{key: key, enter: enter, ready: make(chan struct{})}
	a.waiters = append(a.waiters, w)
	a.mu.Unlock()
	timer := time.NewTimer(a.wait)
	defer timer.Stop()
	select {
	case <-w.ready:
		return true
	case <-timer.C:
	case <-ctx.Done():
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if w.granted { // just in time
		return true
	}
	if i := slices.Index(a.waiters, w); i >= 0 {
		a.waiters = slices.Delete(a.waiters, i, i+1)
	}
	return false
}

// grantLocked gives freed places to the waiters that fit, oldest first.
// Caller holds a.mu.
func (a *admission) grantLocked() {
	for i := 0; i < len(a.waiters); {
		w := a.waiters[i]
		if !a.fitsLocked(w.key, w.enter) {
			i++
			continue
		}
		a.takeLocked(w.key, w.enter)
		w.granted = true
		close(w.ready)
		a.waiters = slices.Delete(a.waiters, i, i+1)
	}
}

// enter takes a place for a tunnel from p, or says why there is none.
func (a *admission) enter(ctx context.Context, p *peer.Peer) (*ticket, *status.Status, string) {
	key := peerKey(p)
	if !a.acquire(ctx, key, true) {
		a.mu.Lock()
		defer a.mu.Unlock()
		if a.maxTotal > 0 && a.total >= a.maxTotal {
			return nil, status.Newf(codes.ResourceExhausted, "too many tunnels waiting to register (%d): retry later", a.maxTotal), "unregistered_limit"
		}
		return nil, status.Newf(codes.ResourceExhausted, "too many tunnels waiting to register from %s (%d): retry later", key, a.maxPer), "peer_limit"
	}
	return &ticket{a: a, key: key}, nil, ""
}

// identify moves the ticket to the authenticated user's count, waiting
// for a place there as enter does.
func (t *ticket) identify(ctx context.Context, user string) (*status.Status, string) {
	if user == "" {
		return nil, ""
	}
	key := "user " + user
	a := t.a
	// Give the peer's place back first: waiting for the user's while
	// holding it could leave every place of a shared peer (a proxy, a
	// unix socket) to tunnels that all wait for one busy user.
	a.mu.Lock()
	a.dropLocked(t.key)
	t.key = ""
	a.grantLocked()
	a.mu.Unlock()
	if !a.acquire(ctx, key, false) {
		return status.Newf(codes.ResourceExhausted, "too many tunnels of %q waiting to register (%d): retry later", quote(user), a.maxPer), "peer_limit"
	}
	t.key = key
	return nil, ""
}

// leave gives the place back; it is idempotent.
func (t *ticket) leave() {
	a := t.a
	a.mu.Lock()
	defer a.mu.Unlock()
	if t.done {
		return
	}
	t.done = true
	a.total--
	unregisteredGauge.Dec()
	if t.key != "" {
		a.dropLocked(t.key)
	}
	a.grantLocked()
}

func (a *admission) dropLocked(key string) {
	if a.byKey[key]--; a.byKey[key] <= 0 {
		delete(a.byKey, key)
	}
}

// peerKey is the address a peer counts under: its IP, without the port.
func peerKey(p *peer.Peer) string {
	if p == nil || p.Addr == nil {
		return "unknown peer"
	}
	switch a := p.Addr.(type) {
	case *net.TCPAddr:
		return a.IP.String()
	case *net.UnixAddr:
		return "unix socket"
	}
	if host, _, err := net.SplitHostPort(p.Addr.String()); err == nil {
		return host
	}
	return p.Addr.Network()
}
