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
func (t *Tunnel) heartbeat() {
	defer t.wg.Done()
	select {
	case <-t.helloC:
	case <-t.done:
		return
	}
	t.mu.Lock()
	interval := heartbeatInterval(t.local, t.peer, t.cfg.MaxHeartbeatInterval)
	t.mu.Unlock()
	timeout := time.Duration(float64(interval) * heartbeatTimeoutFactor)
	tick := time.NewTicker(interval / heartbeatChecksPerInterval)
	defer tick.Stop()
	var nonce uint64
	for n := 1; ; n++ {
		select {
		case <-t.done:
			return
		case now := <-tick.C:
			if silent := now.Sub(time.Unix(0, t.lastRecv.Load())); silent > timeout {
				t.close(status.Newf(codes.Unavailable, "heartbeat timeout: nothing received from the peer for %v", silent.Round(time.Millisecond)))
				return
			}
			if n%heartbeatChecksPerInterval == 0 {
				nonce++
				t.w.control(pingFrame(nonce))
			}
		}
	}
}
