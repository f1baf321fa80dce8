package registry

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"google.golang.org/grpc"

	"github.com/guilhem/operator-plugin-framework/go/internal/callerr"
)

// ErrNotFound is what Get's error wraps when no instance of a plugin is
// connected.
var ErrNotFound = errors.New("plugin not connected")

// ErrRefused is what a Conn's error wraps when the Conn turned a call away
// before sending any of it: it stopped accepting calls (it began to drain,
// or closed) between the registry's choice and the call. The call cannot
// have run, so the registry chooses another instance for it.
var ErrRefused = callerr.ErrRefused

// Plugins is what a reconciler needs from the registry: *Registry
// implements it, and a reconciler that holds a Plugins rather than a
// *Registry can be given a fake in tests (NewProvider makes a provider from
// any connection). The test kit, package plugintest, gives a real one.
type Plugins interface {
	// Get returns a handle on the plugin called name, or an error wrapping
	// ErrNotFound while no instance of it is connected.
	Get(name string, opts ...Option) (*PluginProvider, error)
	// Wait returns a handle on the plugin called name once an instance of
	// it accepts calls, or an error when ctx ends first.
	Wait(ctx context.Context, name string, opts ...Option) (*PluginProvider, error)
}

var _ Plugins = (*Registry)(nil)

// Conn is one instance's tunnel, as the registry needs it. A call it turns
// away without sending any of it fails with an error wrapping ErrRefused.
//
// A Conn that also has an Err() error method (the server's tunnels do) is
// asked, when its instance leaves, why it closed: calls made while no
// instance is connected then say why the last one left.
type Conn interface {
	grpc.ClientConnInterface
	// InFlight is the number of calls open on the tunnel.
	InFlight() int
	// Accepting reports whether the tunnel takes new calls (false while
	// it drains).
	Accepting() bool
}

// Instance describes one connected plugin instance.
type Instance struct {
	// ID is unique among all instances the registry has seen.
	ID      string
	Name    string
	Version string
	// Services are the full names of the gRPC services the instance
	// serves ("demo.v1.ValidatorService"); calls go only to instances
	// that serve the call's service.
	Services []string
	Labels   map[string]string
	// Identity is who the plugin authenticated as, if anyone.
	Identity    string
	ConnectedAt time.Time
}

type entry struct {
	Instance
	conn Conn
}

// maxDepartures bounds how many plugin names the registry remembers the
// last departure of (names come from plugins, which could invent many).
const maxDepartures = 256

// Registry holds the plugins connected to a server. It is safe for
// concurrent use.
type Registry struct {
	cfg config // the options every provider starts from

	mu       sync.Mutex
	byName   map[string][]*entry // newest last
	departed map[string]string   // name -> why its last instance left, while none is connected
	changed  chan struct{}       // closed and replaced on every change
	watchers map[*watcher]struct{}
}

// New returns an empty registry whose providers all use opts (interceptors,
// stats handlers, default call options and timeout, filters). Give it to
// the server with server.WithRegistry:
//
//	reg := registry.New(registry.WithStatsHandler(otelgrpc.NewClientHandler()))
//	srv, err := server.New(addr, server.WithRegistry(reg))
func New(opts ...Option) *Registry {
	return &Registry{
		cfg:      config{}.with(opts),
		byName:   map[string][]*entry{},
		departed: map[string]string{},
		changed:  make(chan struct{}),
		watchers: map[*watcher]struct{}{},
	}
}

// Add records a connected instance; remove forgets it. The server calls
// these; other code does not need to, except to fake instances in tests.
func (r *Registry) Add(inst Instance, conn Conn) (remove func()) {
	e := &entry{Instance: inst, conn: conn}
	r.mu.Lock()
	r.byName[inst.Name] = append(r.byName[inst.Name], e)
	delete(r.departed, inst.Name)
	instancesGauge.WithLabelValues(inst.Name).Inc()
	r.notifyLocked(Event{Type: Registered, Instance: inst})
	r.mu.Unlock()
	var once sync.Once
	return func() { once.Do(func() { r.remove(e) }) }
}

func (r *Registry) remove(e *entry) {
	reason := "drained"
	if ec, ok := e.conn.(interface{ Err() error }); ok {
		if err := ec.Err(); err != nil {
			reason = errorMessage(err)
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	list := r.byName[e.Name]
	i := slices.Index(list, e)
	if i < 0 {
		return
	}
	list = slices.Delete(list, i, i+1)
	if len(list) == 0 {
		delete(r.byName, e.Name)
		// No series is left behind for a plugin that is gone.
		instancesGauge.DeleteLabelValues(e.Name)
		if len(r.departed) >= maxDepartures {
			for name := range r.departed { // any one
				delete(r.departed, name)
				break
			}
		}
		r.departed[e.Name] = fmt.Sprintf("its last instance, %s, left: %s", e.ID, reason)
	} else {
		r.byName[e.Name] = list
		instancesGauge.WithLabelValues(e.Name).Dec()
	}
	r.notifyLocked(Event{Type: Unregistered, Instance: e.Instance})
}

// notifyLocked wakes waiters and queues ev for watchers. Caller holds r.mu.
func (r *Registry) notifyLocked(ev Event) {
	close(r.changed)
	r.changed = make(chan struct{})
	for w := range r.watchers {
		w.push(ev)
	}
}

// Get returns a handle on the plugin called name, or an error wrapping
// ErrNotFound when no instance of it (none that opts keep, with a filter)
// is connected. The handle stays valid: each call goes to whichever
// suitable instance is connected when it starts.
func (r *Registry) Get(name string, opts ...Option) (*PluginProvider, error) {
	p := r.Plugin(name, opts...)
	r.mu.Lock()
	defer r.mu.Unlock()
	if !slices.ContainsFunc(r.byName[name], func(e *entry) bool { return p.cfg.keep(e.Instance) }) {
		return nil, fmt.Errorf("plugin %q: %w", name, ErrNotFound)
	}
	return p, nil
}

// Plugin returns a handle on the plugin called name whether or not it is
// connected now. Calls fail with UNAVAILABLE while no instance is
// connected, or wait for one with grpc.WaitForReady(true).
func (r *Registry) Plugin(name string, opts ...Option) *PluginProvider {
	return &PluginProvider{name: name, cfg: r.cfg.with(opts), r: r}
}

// Wait returns a handle on the plugin called name once an instance of it
// (one that opts keep) is connected and accepting calls, or an error when
// ctx ends first, with the code of ctx's error and what was missing.
func (r *Registry) Wait(ctx context.Context, name string, opts ...Option) (*PluginProvider, error) {
	p := r.Plugin(name, opts...)
	if _, err := p.pick(ctx, "", true); err != nil {
		return nil, err
	}
	return p, nil
}

// List returns every connected instance, sorted by name then connection
// time.
func (r *Registry) List() []Instance {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []Instance
	for _, list := range r.byName {
		for _, e := range list {
			out = append(out, e.Instance)
		}
	}
	slices.SortFunc(out, func(a, b Instance) int {
		if a.Name != b.Name {
			if a.Name < b.Name {
				return -1
			}
			return 1
		}
		return a.ConnectedAt.Compare(b.ConnectedAt)
	})
	return out
}
