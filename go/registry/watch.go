package registry

import (
	"context"
	"sync"
)

// EventType says what happened to an instance.
type EventType uint8

const (
	// Registered: an instance connected and registered.
	Registered EventType = iota + 1
	// Unregistered: an instance's tunnel closed.
	Unregistered
)

func (t EventType) String() string {
	switch t {
	case Registered:
		return "Registered"
	case Unregistered:
		return "Unregistered"
	}
	return "Unknown"
}

// Event reports a registration or a departure.
type Event struct {
	Type     EventType
	Instance Instance
}

// watcher queues events for one Watch call. Its queue holds at most one
// event per instance: an instance that registered and left before the
// watcher read either event is dropped, so the queue is bounded by the
// number of instances rather than by how slowly the watcher reads.
type watcher struct {
	mu      sync.Mutex
	pending []Event
	wake    chan struct{}
}

func (w *watcher) push(ev Event) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for i, p := range w.pending {
		if p.Instance.ID == ev.Instance.ID {
			// Registered then Unregistered before delivery: neither matters.
			w.pending = append(w.pending[:i], w.pending[i+1:]...)
			return
		}
	}
	w.pending = append(w.pending, ev)
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

func (w *watcher) pop() (Event, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.pending) == 0 {
		return Event{}, false
	}
	ev := w.pending[0]
	w.pending = w.pending[1:]
	return ev, true
}

// Watch returns a channel of events: first a Registered event for every
// instance connected now, then each change, until ctx ends, when the
// channel is closed. A slow reader never blocks the registry.
func (r *Registry) Watch(ctx context.Context) <-chan Event {
	w := &watcher{wake: make(chan struct{}, 1)}
	r.mu.Lock()
	for _, list := range r.byName {
		for _, e := range list {
			w.pending = append(w.pending, Event{Type: Registered, Instance: e.Instance})
		}
	}
	r.watchers[w] = struct{}{}
	r.mu.Unlock()

	out := make(chan Event)
	go func() {
		defer close(out)
		defer func() {
			r.mu.Lock()
			delete(r.watchers, w)
			r.mu.Unlock()
		}()
		for {
			ev, ok := w.pop()
			if !ok {
				select {
				case <-w.wake:
					continue
				case <-ctx.Done():
					return
				}
			}
			select {
			case out <- ev:
			case <-ctx.Done():
				return
			}
		}
	}()
	return out
}
