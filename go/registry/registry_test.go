package registry

import (
	"context"
	"fmt"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// svc lists the service of the tests' method "/s/m".
var svc = []string{"s"}

// conn is an instance's connection as the registry sees it; calls record
// which instance took them.
type conn struct {
	name      string
	inFlight  int
	accepting bool
	refuse    bool // starts draining just as a call comes
	calls     *[]string
	err       error // what Err reports once the instance left
	ctx       context.Context
	opts      []grpc.CallOption
}

func (c *conn) Err() error { return c.err }

func (c *conn) call() error {
	*c.calls = append(*c.calls, c.name)
	if c.refuse {
		c.accepting = false
		return fmt.Errorf("draining: %w", ErrRefused)
	}
	return nil
}

func (c *conn) Invoke(ctx context.Context, _ string, _, _ any, opts ...grpc.CallOption) error {
	c.ctx, c.opts = ctx, opts
	return c.call()
}

func (c *conn) NewStream(context.Context, *grpc.StreamDesc, string, ...grpc.CallOption) (grpc.ClientStream, error) {
	return nil, c.call()
}

func (c *conn) InFlight() int   { return c.inFlight }
func (c *conn) Accepting() bool { return c.accepting }

func TestPickLeastBusyThenNewest(t *testing.T) {
	r := New()
	var calls []string
	old := &conn{name: "old", accepting: true, calls: &calls}
	young := &conn{name: "young", accepting: true, calls: &calls}
	r.Add(Instance{ID: "1", Name: "p", Services: svc}, old)
	r.Add(Instance{ID: "2", Name: "p", Services: svc}, young)
	p, err := r.Get("p")
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	p.Invoke(ctx, "/s/m", nil, nil) // tie: the newest
	young.inFlight = 3
	p.Invoke(ctx, "/s/m", nil, nil) // the least busy
	old.accepting = false
	p.Invoke(ctx, "/s/m", nil, nil) // a draining instance takes nothing
	want := []string{"young", "old", "young"}
	for i := range want {
		if calls[i] != want[i] {
			t.Fatalf("calls went to %v, want %v", calls, want)
		}
	}
	young.accepting = false
	if err := p.Invoke(ctx, "/s/m", nil, nil); status.Code(err) != codes.Unavailable {
		t.Fatalf("no accepting instance: %v, want UNAVAILABLE", err)
	}
}

func TestRefusedCallsGoElsewhere(t *testing.T) {
	r := New()
	var calls []string
	r.Add(Instance{ID: "1", Name: "p", Services: svc}, &conn{name: "steady", accepting: true, calls: &calls})
	r.Add(Instance{ID: "2", Name: "p", Services: svc}, &conn{name: "draining", accepting: true, refuse: true, calls: &calls})
	p := r.Plugin("p")
	if err := p.Invoke(context.Background(), "/s/m", nil, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := p.NewStream(context.Background(), &grpc.StreamDesc{}, "/s/m"); err != nil {
		t.Fatal(err)
	}
	want := []string{"draining", "steady", "steady"}
	if fmt.Sprint(calls) != fmt.Sprint(want) {
		t.Fatalf("calls went to %v, want %v", calls, want)
	}
}

func TestRemoveIsPerInstance(t *testing.T) {
	r := New()
	var calls []string
	removeA := r.Add(Instance{ID: "a", Name: "p", Services: svc}, &conn{name: "a", accepting: true, calls: &calls})
	r.Add(Instance{ID: "b", Name: "p", Services: svc}, &conn{name: "b", accepting: true, calls: &calls})
	removeA()
	removeA() // idempotent: must not remove b
	list := r.List()
	if len(list) != 1 || list[0].ID != "b" {
		t.Fatalf("List = %v, want only b", list)
	}
}

func TestWatchCoalescesForSlowReaders(t *testing.T) {
	r := New()
	var calls []string
	r.Add(Instance{ID: "before", Name: "p", Services: svc}, &conn{accepting: true, calls: &calls})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	events := r.Watch(ctx)
	// Many instances come and go before the watcher reads anything: only
	// what is still true is queued.
	for i := range 1000 {
		remove := r.Add(Instance{ID: string(rune('a'+i%26)) + time.Now().String(), Name: "q", Services: svc}, &conn{calls: &calls})
		remove()
	}
	r.Add(Instance{ID: "after", Name: "p", Services: svc}, &conn{accepting: true, calls: &calls})
	var got []string
	for range 2 {
		select {
		case ev := <-events:
			got = append(got, ev.Type.String()+" "+ev.Instance.ID)
		case <-time.After(5 * time.Second):
			t.Fatalf("events so far %v", got)
		}
	}
	if got[0] != "Registered before" || got[1] != "Registered after" {
		t.Fatalf("events %v", got)
	}
	select {
	case ev := <-events:
		t.Fatalf("unexpected event %v", ev)
	case <-time.After(50 * time.Millisecond):
	}
	cancel()
	for range events {
	}
}

func TestWaitReturnsOnRegistration(t *testing.T) {
	r := New()
	var calls []string
	go func() {
		time.Sleep(20 * time.Millisecond)
		r.Add(Instance{ID: "1", Name: "p", Services: svc}, &conn{accepting: true, calls: &calls})
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := r.Wait(ctx, "p"); err != nil {
		t.Fatal(err)
	}
	ctx, cancel = context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if _, err := r.Wait(ctx, "absent"); status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("Wait for an absent plugin: %v", err)
	}
}
