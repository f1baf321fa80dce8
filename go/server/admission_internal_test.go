package server

import (
	"context"
	"net"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
)

// A tunnel over the unregistered limits waits for a place, gets the first
// one freed, and is refused with RESOURCE_EXHAUSTED when none frees in
// time or too many already wait.
func TestAdmissionWaitsInLine(t *testing.T) {
	a := newAdmission(limits{maxUnregistered: 1, maxUnregisteredPer: 1}, 200*time.Millisecond)
	a.maxWaiting = 1
	p := &peer.Peer{Addr: &net.TCPAddr{IP: net.IPv4(10, 0, 0, 1)}}
	ctx := context.Background()
	first, st, _ := a.enter(ctx, p)
	if st != nil {
		t.Fatal(st)
	}
	got := make(chan *ticket)
	go func() {
		tk, st, _ := a.enter(ctx, p)
		if st != nil {
			t.Error(st)
		}
		got <- tk
	}()
	for {
		a.mu.Lock()
		n := len(a.waiters)
		a.mu.Unlock()
		if n == 1 {
			break
		}
		time.Sleep(time.Millisecond)
	}
	// The line is full: refused at once.
	start := time.Now()
	if _, st, why := a.enter(ctx, p); st.Code() != codes.ResourceExhausted || why != "unregistered_limit" || time.Since(start) > 50*time.Millisecond {
		t.Fatalf("with the line full: %v %q after %v, want RESOURCE_EXHAUSTED at once", st, why, time.Since(start))
	}
	first.leave()
	second := <-got
	// Nobody leaves: refused after the wait (100 ms, half the handshake timeout).
	start = time.Now()
	if _, st, _ := a.enter(ctx, p); st.Code() != codes.ResourceExhausted || time.Since(start) < 90*time.Millisecond {
		t.Fatalf("after waiting: %v after %v, want RESOURCE_EXHAUSTED after 100 ms", st, time.Since(start))
	}
	// A tunnel that leaves while waiting gives up its turn.
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, st, _ := a.enter(cctx, p); st == nil {
		t.Fatal("a cancelled tunnel got a place")
	}
	second.leave()
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.total != 0 || len(a.byKey) != 0 || len(a.waiters) != 0 {
		t.Fatalf("left: total %d, by key %v, %d waiting", a.total, a.byKey, len(a.waiters))
	}
}
