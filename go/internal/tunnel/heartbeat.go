package tunnel

import (
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// heartbeatChecksPerInterval: how often within an interval silence is
// checked, so that detection lands at most a quarter interval late.
const heartbeatChecksPerInterval = 4

// heartbeat pings the peer every interval and closes the tunnel when the
// peer has sent nothing for heartbeatTimeoutFactor intervals. Application
// pings are needed because HTTP/2 pings stop at proxies such as
// kube-rbac-proxy.
//
// Cost: a timer, not a goroutine. With thousands of idle tunnels a
// goroutine each would be 8 KiB of stack per tunnel for a wake-up every
// few seconds; the timer's function runs in a goroutine only while it
// checks.
type heartbeat struct {
	t        *Tunnel
	interval time.Duration
	timeout  time.Duration
	timer    *time.Timer // guarded by t.mu; nil once stopped
	n        int         // checks so far; only the timer's function uses it
	nonce    uint64
}

// startHeartbeat arms the heartbeat once the peer's Hello has set the
// interval. Caller holds t.mu.
func (t *Tunnel) startHeartbeatLocked() {
	interval := heartbeatInterval(t.local, t.peer, t.cfg.MaxHeartbeatInterval)
	h := &heartbeat{t: t, interval: interval, timeout: time.Duration(float64(interval) * heartbeatTimeoutFactor)}
	t.hb = h
	h.timer = time.AfterFunc(interval/heartbeatChecksPerInterval, h.check)
}

// stopHeartbeatLocked stops the heartbeat for good. Caller holds t.mu.
func (t *Tunnel) stopHeartbeatLocked() {
	if t.hb != nil && t.hb.timer != nil {
		t.hb.timer.Stop()
		t.hb.timer = nil
	}
}

// check runs every quarter interval (never two at once: the timer is
// re-armed only at its end).
func (h *heartbeat) check() {
	t := h.t
	if silent := time.Since(time.Unix(0, t.lastRecv.Load())); silent > h.timeout {
		t.close(status.Newf(codes.Unavailable, "heartbeat timeout: nothing received from the peer for %v", silent.Round(time.Millisecond)))
		return
	}
	if h.n++; h.n%heartbeatChecksPerInterval == 0 {
		h.nonce++
		t.w.control(pingFrame(h.nonce))
	}
	t.mu.Lock()
	if h.timer != nil {
		h.timer.Reset(h.interval / heartbeatChecksPerInterval)
	}
	t.mu.Unlock()
}
