package registry

import (
	"context"
	"errors"
	"slices"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/guilhem/operator-plugin-framework/go/internal/callerr"
)

// ErrNotFound is returned by Get when no instance of a plugin is connected.
var ErrNotFound = errors.New("plugin not connected")

// ErrRefused is what a Conn's error wraps when the Conn turned a call away
// before sending any of it: it stopped accepting calls (it began to drain,
// or closed) between the registry's choice and the call. The call cannot
// have run, so the registry chooses another instance for it.
var ErrRefused = callerr.ErrRefused

// Conn is one instance's tunnel, as the registry needs it. A call it turns
// away without sending any of it fails with an error wrapping ErrRefused.
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
	ID       string
	Name     string
	Version  string
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

// Registry holds the plugins connected to a server. It is safe for
// concurrent use.
type Registry struct {
	mu       sync.Mutex
	byName   map[string][]*entry // newest last
	changed  chan struct{}       // closed and replaced on every change
	watchers map[*watcher]struct{}
}

// New returns an empty registry.
func New() *Registry {
	return &Registry{
		byName:   map[string][]*entry{},
		changed:  make(chan struct{}),
		watchers: map[*watcher]struct{}{},
	}
}

// Add records a connected instance; remove forgets it. The server calls
// these; other code does not need to.
func (r *Registry) Add(inst Instance, conn Conn) (remove func()) {
	e := &entry{Instance: inst, conn: conn}
	r.mu.Lock()
	r.byName[inst.Name] = append(r.byName[inst.Name], e)
	instancesGauge.WithLabelValues(inst.Name).Inc()
	r.notifyLocked(Event{Type: Registered, Instance: inst})
	r.mu.Unlock()
	var once sync.Once
	return func() { once.Do(func() { r.remove(e) }) }
}

func (r *Registry) remove(e *entry) {
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
	} else {
		r.byName[e.Name] = list
	}
	instancesGauge.WithLabelValues(e.Name).Dec()
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

// Get returns a handle on the plugin called name, or ErrNotFound when no
// instance of it is connected. The handle stays valid: each call goes to
// whichever instance is connected when it starts.
func (r *Registry) Get(name string) (*PluginProvider, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.byName[name]) == 0 {
		return nil, ErrNotFound
	}
	return &PluginProvider{name: name, r: r}, nil
}

// Plugin returns a handle on the plugin called name whether or not it is
// connected now. Calls fail with UNAVAILABLE while no instance is
// connected, or wait for one with grpc.WaitForReady(true).
func (r *Registry) Plugin(name string) *PluginProvider {
	return &PluginProvider{name: name, r: r}
}

// Wait returns a handle on the plugin called name once an instance of it is
// connected and accepting calls, or ctx's error.
func (r *Registry) Wait(ctx context.Context, name string) (*PluginProvider, error) {
	p := &PluginProvider{name: name, r: r}
	if _, err := p.pick(ctx, true); err != nil {
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

// PluginProvider calls one plugin by name through whichever of its
// instances is connected. It implements grpc.ClientConnInterface, so
// generated clients take it as they take a *grpc.ClientConn:
//
//	p, err := reg.Get("validator")
//	client := validatorv1.NewValidatorServiceClient(p)
type PluginProvider struct {
	name string
	r    *Registry
}

var _ grpc.ClientConnInterface = (*PluginProvider)(nil)

// Name is the plugin's name.
func (p *PluginProvider) Name() string { return p.name }

// Instances lists the plugin's connected instances, oldest first.
func (p *PluginProvider) Instances() []Instance {
	p.r.mu.Lock()
	defer p.r.mu.Unlock()
	list := p.r.byName[p.name]
	out := make([]Instance, len(list))
	for i, e := range list {
		out[i] = e.Instance
	}
	return out
}

// maxRefusals bounds how often one call is sent elsewhere after an
// instance refused it (each refusal comes from a different instance, which
// the registry no longer picks).
const maxRefusals = 8

// Invoke performs a unary call on the least busy instance.
func (p *PluginProvider) Invoke(ctx context.Context, method string, args, reply any, opts ...grpc.CallOption) (err error) {
	start := time.Now()
	defer func() { observe(p.name, method, start, err) }()
	for range maxRefusals {
		var c Conn
		if c, err = p.pick(ctx, waitForReady(opts)); err != nil {
			return err
		}
		if err = c.Invoke(ctx, method, args, reply, opts...); !errors.Is(err, ErrRefused) {
			return err
		}
	}
	return err
}

// NewStream opens a streaming call on the least busy instance.
func (p *PluginProvider) NewStream(ctx context.Context, desc *grpc.StreamDesc, method string, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	start := time.Now()
	var err error
	for range maxRefusals {
		var c Conn
		if c, err = p.pick(ctx, waitForReady(opts)); err != nil {
			break
		}
		var cs grpc.ClientStream
		if cs, err = c.NewStream(ctx, desc, method, opts...); err == nil {
			return &observedStream{ClientStream: cs, plugin: p.name, method: method, start: start}, nil
		}
		if !errors.Is(err, ErrRefused) {
			break
		}
	}
	observe(p.name, method, start, err)
	return nil, err
}

// pick chooses the instance with the fewest calls in flight, the newest on
// a tie (during a rolling upgrade the new version takes the load). With
// wait it waits for an instance instead of failing.
func (p *PluginProvider) pick(ctx context.Context, wait bool) (Conn, error) {
	for {
		p.r.mu.Lock()
		var best Conn
		bestLoad := 0
		list := p.r.byName[p.name]
		for i := len(list) - 1; i >= 0; i-- {
			c := list[i].conn
			if !c.Accepting() {
				continue
			}
			if n := c.InFlight(); best == nil || n < bestLoad {
				best, bestLoad = c, n
			}
		}
		changed := p.r.changed
		p.r.mu.Unlock()
		if best != nil {
			return best, nil
		}
		if !wait {
			return nil, status.Errorf(codes.Unavailable, "plugin %q is not connected", p.name)
		}
		// A draining instance leaves the registry when its tunnel closes;
		// poll as well, since draining itself is not a registry change.
		timer := time.NewTimer(50 * time.Millisecond)
		select {
		case <-changed:
		case <-timer.C:
		case <-ctx.Done():
			timer.Stop()
			return nil, status.FromContextError(ctx.Err()).Err()
		}
		timer.Stop()
	}
}

func waitForReady(opts []grpc.CallOption) bool {
	wait := false
	for _, o := range opts {
		if ff, ok := o.(grpc.FailFastCallOption); ok {
			wait = !ff.FailFast
		}
	}
	return wait
}
