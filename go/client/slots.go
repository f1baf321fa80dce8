package client

import (
	"context"
	"errors"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	pb "github.com/guilhem/operator-plugin-framework/go/gen/pluginframework/v1"
	"github.com/guilhem/operator-plugin-framework/go/internal/tunnel"
)

// The plugin keeps one registered tunnel per operator replica
// (docs/tunnel-spec.md 14.2-14.3): run resolves the target and keeps S
// slots, S = max(addresses, largest replica_count announced, 1); slot i
// dials address i mod A, registers, serves, and reconnects on its own with
// backoff. A slot dials the first address no other tunnel holds, starting
// at address i mod A. A tunnel that reaches a replica another tunnel holds
// is closed before it registers, and its slot tries again later.

// maxSlots bounds the tunnels one plugin keeps (spec 14.2).
const maxSlots = 64

// slot holds at most one registered tunnel. Its fields are guarded by the
// client's mu.
type slot struct {
	c     *Client
	index int

	registration *Registration // while registered
	replicaCount int           // announced by the operator replica this slot holds
}

// claim is one tunnel's hold on the address it dialled and on the
// operator replica it reached.
type claim struct {
	slot *slot
	addr string
	id   string
}

// run resolves the target, keeps the slots it calls for, and on Close
// waits for every tunnel to finish.
func (c *Client) run() {
	defer close(c.done)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-c.closing:
			cancel() // ends a resolution in progress
		case <-ctx.Done():
		}
	}()
	defer func() {
		c.slotsWG.Wait()
		c.draining.Wait()
	}()
	timer := time.NewTimer(0)
	defer timer.Stop()
	attempt := 0
	for {
		select {
		case <-c.closing:
			return
		case <-timer.C:
		case <-c.resolveNow:
			timer.Stop()
		}
		addrs, err := c.target.Resolve(ctx, c.cfg.lookup)
		next := c.cfg.resolveInterval
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			c.setErr(err)
			next = min(next, c.delay(attempt))
			attempt++
			c.log.Info("cannot resolve the operator's addresses", "target", c.target.String(), "error", err, "retry in", next.Round(time.Millisecond))
		} else {
			attempt = 0
			c.mu.Lock()
			if !slices.Equal(c.addrs, addrs) {
				c.log.V(1).Info("operator addresses", "target", c.target.String(), "addresses", addrs)
			}
			c.addrs = addrs
			c.resizeLocked()
			c.mu.Unlock()
		}
		timer.Reset(next)
	}
}

// wantSlotsLocked is S (spec 14.2). Caller holds c.mu.
func (c *Client) wantSlotsLocked() int {
	if len(c.addrs) == 0 {
		return 0
	}
	n := len(c.addrs)
	for _, s := range c.slots {
		n = max(n, s.replicaCount)
	}
	return min(n, maxSlots)
}

// resizeLocked starts the slots S calls for; slots beyond S stop once their
// tunnel ends. Caller holds c.mu.
func (c *Client) resizeLocked() {
	select {
	case <-c.closing:
		return
	default:
	}
	for i := range c.wantSlotsLocked() {
		if c.slots[i] == nil {
			s := &slot{c: c, index: i}
			c.slots[i] = s
			c.slotsWG.Add(1)
			go s.run()
		}
	}
}

// address picks the address slot s dials next and holds it for cl, or
// reports false when s is no longer wanted (then it is forgotten).
func (c *Client) address(s *slot, cl *claim) (string, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	select {
	case <-c.closing:
		return "", false
	default:
	}
	if s.index >= c.wantSlotsLocked() {
		delete(c.slots, s.index)
		return "", false
	}
	n := len(c.addrs)
	start := s.index % n
	cl.addr = c.addrs[start]
	for k := range n {
		if a := c.addrs[(start+k)%n]; c.held[a] == 0 {
			cl.addr = a
			break
		}
	}
	c.held[cl.addr]++
	return cl.addr, true
}

func (c *Client) setErr(err error) {
	c.mu.Lock()
	c.lastErr = err
	c.mu.Unlock()
}

// reresolve asks run to resolve the target again (after a lost tunnel).
func (c *Client) reresolve() {
	select {
	case c.resolveNow <- struct{}{}:
	default:
	}
}

// delay is exponential backoff with jitter, as in gRPC's connection backoff
// (spec 14.2).
func (c *Client) delay(attempt int) time.Duration {
	b := c.cfg.backoff
	d := float64(b.BaseDelay)
	for i := 0; i < attempt && d < float64(b.MaxDelay); i++ {
		d *= b.Multiplier
	}
	d = min(d, float64(b.MaxDelay))
	d *= 1 + b.Jitter*(rand.Float64()*2-1)
	return max(time.Duration(d), 0)
}

func (s *slot) run() {
	c := s.c
	defer c.slotsWG.Done()
	attempt := 0
	for {
		cl := &claim{slot: s}
		addr, ok := c.address(s, cl)
		if !ok {
			return
		}
		registered, err := s.session(addr, cl)
		select {
		case <-c.closing:
			return
		default:
		}
		c.setErr(err)
		if registered {
			attempt = 0
		}
		if errors.Is(err, errGoAway) {
			c.log.Info("operator asked to reconnect", "address", addr)
			continue // at once: the old tunnel still finishes its calls
		}
		c.reresolve()
		delay := c.delay(attempt)
		attempt++
		if status.Code(err) == codes.Unavailable && errors.Is(err, errDuplicate) {
			c.log.V(1).Info("tunnel reached a replica already held, trying again", "address", addr, "in", delay.Round(time.Millisecond))
		} else {
			c.log.Info("tunnel lost, reconnecting", "address", addr, "error", err, "in", delay.Round(time.Millisecond))
		}
		timer := time.NewTimer(delay)
		select {
		case <-timer.C:
		case <-c.closing:
			timer.Stop()
			return
		}
	}
}

var (
	errGoAway                   = errors.New("operator sent GoAway")
	errGoAwayBeforeRegistration = errors.New("operator sent GoAway before answering the registration")
	errHandshakeTimeout         = errors.New("no answer to the registration before the handshake timeout")
	errDuplicate                = errors.New("duplicate tunnel to an operator replica")
)

// duplicateError is the status a duplicate tunnel closes with (spec 14.3).
type duplicateError struct{ st *status.Status }

func (e duplicateError) Error() string              { return e.st.Err().Error() }
func (e duplicateError) GRPCStatus() *status.Status { return e.st }
func (e duplicateError) Unwrap() error              { return errDuplicate }

// session runs one tunnel: connect, register, serve. It returns when the
// tunnel is lost, when the operator sends GoAway (the tunnel then finishes
// its calls in the background), or after draining it on Close.
func (s *slot) session(addr string, cl *claim) (registered bool, err error) {
	c := s.c
	defer c.release(cl)
	// A connection of its own: behind a load balancer, each attempt must
	// be free to reach another replica.
	cc, err := grpc.NewClient(addr, c.dial...)
	if err != nil {
		return false, err
	}
	background := false // the tunnel outlives the session: it closes cc
	defer func() {
		if !background {
			cc.Close()
		}
	}()
	sctx, cancel := context.WithCancelCause(context.Background())
	handshake := time.AfterFunc(c.cfg.handshakeTimeout, func() { cancel(errHandshakeTimeout) })
	defer handshake.Stop()
	stream, err := pb.NewPluginFrameworkServiceClient(cc).Connect(sctx, grpc.ForceCodecV2(tunnel.WireCodec))
	if err != nil {
		cancel(nil)
		return false, err
	}
	goAway := make(chan struct{})
	var goAwayOnce sync.Once
	p, ok := peer.FromContext(stream.Context())
	if !ok {
		p = &peer.Peer{}
	}
	t := tunnel.New(tunnel.ClientTransport(stream), tunnel.Config{
		Side:           tunnel.PluginSide,
		Settings:       c.cfg.settings,
		Register:       c.reg,
		Handler:        c.disp,
		Peer:           p,
		Logger:         c.log,
		BeforeRegister: func(r tunnel.Replica) *status.Status { return c.hold(cl, r) },
		OnGoAway: func(*status.Status) {
			c.release(cl) // a draining tunnel no longer holds its replica
			goAwayOnce.Do(func() { close(goAway) })
		},
	})
	go func() {
		<-t.Done()
		cancel(nil) // ends the gRPC stream, which unblocks the read loop
	}()

	// The wait for the answer also ends on Close and on a GoAway: the
	// operator will not register this tunnel then.
	rctx, rcancel := context.WithCancelCause(sctx)
	go func() {
		select {
		case <-c.closing:
			rcancel(ErrClosed)
		case <-goAway:
			rcancel(errGoAway)
		case <-rctx.Done():
		}
	}()
	ack, err := t.Registered(rctx)
	rcancel(nil)
	if err != nil {
		cause := context.Cause(rctx)
		switch {
		case errors.Is(cause, errHandshakeTimeout), errors.Is(cause, ErrClosed):
			err = cause
		case errors.Is(cause, errGoAway):
			err = errGoAwayBeforeRegistration
		case isDuplicate(err):
			err = duplicateError{status.Convert(err)}
		}
		t.Close(status.Convert(err))
		t.Wait()
		return false, err
	}
	handshake.Stop()
	reg := &Registration{Address: addr, Replica: t.PeerReplica().ID, Instance: ack.GetInstanceId()}
	c.setRegistered(s, reg)
	c.log.Info("registered", "instance", reg.Instance, "address", addr, "replica", reg.Replica)
	defer c.setRegistered(s, nil)

	select {
	case <-t.Done():
		t.Wait()
		return true, t.Err()
	case <-goAway:
		background = true
		c.draining.Add(1)
		go func() {
			defer c.draining.Done()
			defer cc.Close()
			<-t.Done()
			t.Wait()
		}()
		return true, errGoAway
	case <-c.closing:
		ctx, cancel := context.WithTimeout(context.Background(), c.cfg.drainTimeout)
		defer cancel()
		t.Drain(ctx, status.New(codes.Unavailable, "plugin shutting down"))
		t.Wait()
		return true, nil
	}
}

// isDuplicate reports the status hold gives a duplicate tunnel.
func isDuplicate(err error) bool {
	st, ok := status.FromError(err)
	return ok && st.Code() == codes.Unavailable && strings.HasPrefix(st.Message(), duplicatePrefix)
}

const duplicatePrefix = "duplicate tunnel to replica "

// hold claims the operator replica a tunnel reached, before it registers
// (spec 14.3). A replica another tunnel holds makes this one a duplicate.
func (c *Client) hold(cl *claim, r tunnel.Replica) *status.Status {
	c.mu.Lock()
	defer c.mu.Unlock()
	if r.ID != "" {
		if other, ok := c.replicas[r.ID]; ok && other != cl {
			return status.New(codes.Unavailable, duplicatePrefix+r.ID)
		}
		c.replicas[r.ID] = cl
		cl.id = r.ID
	}
	cl.slot.replicaCount = r.Count
	c.resizeLocked() // a larger replica count calls for more slots
	return nil
}

// release gives up a tunnel's claims; it is idempotent.
func (c *Client) release(cl *claim) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if cl.id != "" && c.replicas[cl.id] == cl {
		delete(c.replicas, cl.id)
		cl.slot.replicaCount = 0
	}
	cl.id = ""
	if cl.addr != "" {
		if c.held[cl.addr]--; c.held[cl.addr] == 0 {
			delete(c.held, cl.addr)
		}
		cl.addr = ""
	}
}

func (c *Client) setRegistered(s *slot, r *Registration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	s.registration = r
	registered := false
	for _, o := range c.slots {
		registered = registered || o.registration != nil
	}
	select {
	case <-c.ready:
		if !registered {
			c.ready = make(chan struct{})
		}
	default:
		if registered {
			close(c.ready)
		}
	}
}
