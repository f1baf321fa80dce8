package server

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/experimental"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/manager"

	pb "github.com/guilhem/operator-plugin-framework/go/gen/pluginframework/v1"
	"github.com/guilhem/operator-plugin-framework/go/internal/target"
	"github.com/guilhem/operator-plugin-framework/go/internal/tunnel"
	"github.com/guilhem/operator-plugin-framework/go/registry"
)

// Identity is who opened a tunnel.
type Identity struct {
	// User is the authenticated user name, for a ServiceAccount
	// "system:serviceaccount:NAMESPACE:NAME". Empty when unauthenticated.
	User   string
	Groups []string
	// UID and Extra complete the user's description for authorization
	// (SubjectAccessReview). Optional.
	UID   string
	Extra map[string][]string
	// ExpiresAt is when the credentials behind this identity expire; zero
	// when unknown. The server drains the tunnel before then (see
	// WithTokenExpiryMargin).
	ExpiresAt time.Time
	// Peer is the transport's view of the caller: address and TLS state.
	Peer *peer.Peer
}

// Registration is what a plugin asks to be registered as.
type Registration struct {
	Name     string
	Version  string
	Services []string
	Labels   map[string]string
}

// Server accepts plugin tunnels and records them in its registry. It is a
// controller-runtime Runnable: add it to a manager with mgr.Add.
type Server struct {
	addr string
	cfg  config
	reg  *registry.Registry
	log  atomic.Pointer[logr.Logger]
	adm  *admission

	started  atomic.Bool
	nextID   atomic.Uint64
	mu       sync.Mutex
	tunnels  map[*tunnel.Tunnel]*drainCause
	draining bool
	bound    chan struct{} // closed once listening, or once that failed
	lisAddr  net.Addr
	lisErr   error
}

var (
	_ manager.Runnable               = (*Server)(nil)
	_ manager.LeaderElectionRunnable = (*Server)(nil)
)

// New returns a server that will listen on addr when started:
// "unix:///absolute/path" (a stale socket file is removed),
// "tcp://host:port" or "host:port" (an empty host listens on every
// interface). New fails on any other form, and on a TCP address without
// an authenticator (WithAuthenticator) unless WithInsecureNoAuthentication
// says so.
func New(addr string, opts ...Option) (*Server, error) {
	cfg := config{
		drainTimeout:     defaultDrainTimeout,
		handshakeTimeout: defaultHandshakeTimeout,
		policy:           func(context.Context, Identity, Registration) error { return nil },
		authenticate:     anonymous,
	}
	cfg.settings.HeartbeatInterval = tunnel.DefaultHeartbeatInterval
	cfg.settings.MaxBatchSize = defaultMaxBatchSize
	for _, o := range opts {
		o.apply(&cfg)
	}
	if err := cfg.settings.Validate(); err != nil {
		return nil, err
	}
	if err := cfg.security.err; err != nil {
		return nil, err
	}
	network := "tcp"
	if cfg.listener != nil {
		network = cfg.listener.Addr().Network()
	} else {
		var err error
		if network, _, err = target.ParseListen(addr); err != nil {
			return nil, err
		}
	}
	if network == "tcp" && !cfg.authenticated && !cfg.insecureNoAuth {
		return nil, fmt.Errorf("plugin server: refusing to serve %q on TCP without an authenticator: "+
			"anyone who reaches it could register as any plugin and receive its calls; "+
			"use auth.BuiltIn or auth.BehindKubeRBACProxy (docs/security.md), a unix socket, "+
			"or WithInsecureNoAuthentication to accept that", addr)
	}
	if cfg.registry == nil {
		cfg.registry = registry.New()
	}
	if cfg.replicaID == "" {
		cfg.replicaID = defaultReplicaID()
	}
	if len(cfg.replicaID) > 253 || cfg.replicaCount < 0 {
		return nil, fmt.Errorf("replica id %q longer than 253 bytes or negative count %d", quote(cfg.replicaID), cfg.replicaCount)
	}
	s := &Server{addr: addr, cfg: cfg, reg: cfg.registry, adm: newAdmission(cfg.limits, cfg.handshakeTimeout),
		tunnels: map[*tunnel.Tunnel]*drainCause{}, bound: make(chan struct{})}
	discard := logr.Discard()
	s.log.Store(&discard)
	return s, nil
}

// defaultReplicaID is the host name and a random suffix: unique among the
// pods of a Deployment, and across restarts of one process's container.
func defaultReplicaID() string {
	host, err := os.Hostname()
	if err != nil || host == "" {
		host = "operator"
	}
	return fmt.Sprintf("%s-%08x", quote(host), rand.Uint32())
}

func anonymous(ctx context.Context) (Identity, error) {
	p, _ := peer.FromContext(ctx)
	return Identity{Peer: p}, nil
}

// GetRegistry returns the registry the server records plugins in.
func (s *Server) GetRegistry() *registry.Registry { return s.reg }

// NeedLeaderElection is false: every replica of an operator serves plugins,
// so plugin connections that land on a standby still work.
func (s *Server) NeedLeaderElection() bool { return false }

// Addr returns the address the server listens on, waiting until it does or
// ctx ends. If Start could not listen, Addr returns that error.
func (s *Server) Addr(ctx context.Context) (net.Addr, error) {
	select {
	case <-s.bound:
		return s.lisAddr, s.lisErr
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// errStarted is Start's error when called again.
var errStarted = errors.New("plugin server: Start called more than once")

// Start serves until ctx ends, then drains: every plugin is told to go away,
// calls in flight get the drain timeout to finish, and the tunnels close.
// It returns nil after a clean shutdown. A Server starts once: a second
// call returns an error.
func (s *Server) Start(ctx context.Context) error {
	if !s.started.CompareAndSwap(false, true) {
		return errStarted
	}
	base := log.FromContext(ctx)
	if s.cfg.logger != nil {
		base = *s.cfg.logger
	}
	lg := rateLimited(base.WithValues("component", "plugin-server", "address", s.addr))
	s.log.Store(&lg)
	if r := s.cfg.security.reloader; r != nil {
		r.setLogger(lg)
	}
	lis, err := s.listen()
	if err != nil {
		s.lisErr = err
		close(s.bound)
		return err
	}
	s.lisAddr = lis.Addr()
	close(s.bound)

	local := s.cfg.settings.WithDefaults()
	opts := append([]grpc.ServerOption{
		grpc.ForceServerCodecV2(tunnel.WireCodec),
		grpc.MaxRecvMsgSize(local.MaxBatchSize),
		grpc.MaxSendMsgSize(1<<31 - 1), // batches are sized to the plugin's limit
		experimental.BufferPool(tunnel.BufferPool),
	}, s.cfg.limits.grpcOptions()...)
	gs := grpc.NewServer(append(opts, s.cfg.grpcOptions...)...)
	pb.RegisterPluginFrameworkServiceServer(gs, wireService{s: s})

	served := make(chan error, 1)
	go func() { served <- gs.Serve(lis) }()
	lg.Info("serving plugins")
	select {
	case err := <-served:
		return fmt.Errorf("plugin server: %w", err)
	case <-ctx.Done():
	}

	lg.Info("draining plugin tunnels", "timeout", s.cfg.drainTimeout)
	s.drain()
	stopped := make(chan struct{})
	go func() {
		gs.GracefulStop() // every tunnel handler has returned or is returning
		close(stopped)
	}()
	select {
	case <-stopped:
	case <-time.After(time.Second):
		gs.Stop()
		<-stopped
	}
	<-served
	lg.Info("plugin server stopped")
	return nil
}

// listen opens the listener (or takes WithListener's), checks it against
// the options that constrain it, and applies the connection limits.
func (s *Server) listen() (net.Listener, error) {
	lis := s.cfg.listener
	if lis == nil {
		var err error
		if lis, err = listen(s.addr); err != nil {
			return nil, err
		}
	}
	fail := func(err error) (net.Listener, error) {
		if s.cfg.listener == nil {
			lis.Close()
		}
		return nil, err
	}
	if err := s.cfg.localProxy.checkListener(lis.Addr()); err != nil {
		return fail(err)
	}
	if s.cfg.requireTLS && !s.cfg.tls && !localOnly(lis.Addr()) {
		return fail(fmt.Errorf("plugin server: refusing to take bearer tokens in clear on %s %s: serve TLS (WithTLS), or listen on a unix socket or loopback address", lis.Addr().Network(), lis.Addr()))
	}
	var check func(net.Conn) error
	if s.cfg.localProxy.enabled {
		check = s.cfg.localProxy.checkConn
	}
	return newLimitListener(lis, s.cfg.limits, check, *s.log.Load()), nil
}

// localOnly reports a unix socket or a loopback TCP address.
func localOnly(a net.Addr) bool {
	switch a := a.(type) {
	case *net.UnixAddr:
		return true
	case *net.TCPAddr:
		return a.IP.IsLoopback()
	}
	return false
}

// drainCause records why the server drained a tunnel, for the log line
// about its end.
type drainCause struct {
	mu     sync.Mutex
	reason string
}

func (c *drainCause) set(reason string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.reason == "" {
		c.reason = reason
	}
}

func (c *drainCause) get() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.reason
}

// drain sends GoAway on every tunnel, waits up to the drain timeout for
// their calls, and closes them.
func (s *Server) drain() {
	s.mu.Lock()
	s.draining = true
	tunnels := make(map[*tunnel.Tunnel]*drainCause, len(s.tunnels))
	for t, c := range s.tunnels {
		tunnels[t] = c
	}
	s.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.drainTimeout)
	defer cancel()
	const why = "operator shutting down"
	reason := status.New(codes.Unavailable, why)
	var wg sync.WaitGroup
	for t, c := range tunnels {
		c.set(why)
		wg.Go(func() { t.Drain(ctx, reason) })
	}
	wg.Wait()
}

// wireService is the gRPC service plugins call; it is not part of the
// Server's API.
type wireService struct {
	pb.UnimplementedPluginFrameworkServiceServer
	s *Server
}

func (w wireService) Connect(stream grpc.BidiStreamingServer[pb.ConnectRequest, pb.ConnectResponse]) error {
	return w.s.connect(stream)
}

// connect serves one tunnel: admission, authentication, handshake,
// registration, then calls until the tunnel closes.
func (s *Server) connect(stream grpc.BidiStreamingServer[pb.ConnectRequest, pb.ConnectResponse]) error {
	ctx := stream.Context()
	lg := *s.log.Load()
	p, _ := peer.FromContext(ctx)
	refuse := func(reason string, st *status.Status) error {
		tunnelsRefused.WithLabelValues(reason).Inc()
		lg.Info("tunnel refused", "peer", peerKey(p), "code", st.Code(), "reason", st.Message())
		return st.Err()
	}
	tk, st, why := s.adm.enter(ctx, p)
	if st != nil {
		return refuse(why, st)
	}
	defer tk.leave()
	id, err := s.cfg.authenticate(ctx)
	if err != nil {
		st, ok := status.FromError(err)
		if !ok {
			st = status.New(codes.Unauthenticated, err.Error())
		}
		tunnelsRefused.WithLabelValues("unauthenticated").Inc()
		lg.V(1).Info("tunnel refused", "peer", peerKey(p), "code", st.Code(), "reason", st.Message())
		return st.Err()
	}
	if st, why := tk.identify(ctx, id.User); st != nil {
		return refuse(why, st)
	}
	// This goroutine, which gRPC started for the stream and which would
	// otherwise only wait, reads the tunnel (streamend.go); the handshake
	// runs in a goroutine of its own that ends once the plugin is
	// registered.
	end := streamEnder(ctx)
	t := tunnel.New(tunnel.ServerTransport(stream), tunnel.Config{
		Side:                 tunnel.OperatorSide,
		Settings:             s.cfg.settings,
		Replica:              tunnel.Replica{ID: s.cfg.replicaID, Count: s.cfg.replicaCount},
		MaxHeartbeatInterval: heartbeatCapFactor * s.cfg.settings.HeartbeatInterval,
		Peer:                 p,
		Logger:               lg,
		ReadInCaller:         end != nil,
		OnClose:              end,
	})
	cause := &drainCause{}
	if !s.track(t, cause) {
		t.Close(status.New(codes.Unavailable, "operator shutting down"))
		if end != nil {
			t.ReadLoop() // returns at once: the close ended the stream
		}
		t.Wait()
		return status.Error(codes.Unavailable, "operator shutting down")
	}
	defer s.untrack(t)
	if end == nil {
		return s.serve(ctx, t, tk, id, p, cause, lg)()
	}
	var finish func() error
	handshook := make(chan struct{})
	go func() {
		defer close(handshook)
		finish = s.serve(ctx, t, tk, id, p, cause, lg)
	}()
	t.ReadLoop()
	<-handshook
	return finish()
}

// serve registers the tunnel t and returns what ends it: a function that
// waits until the tunnel has closed, unregisters it, and returns the
// handler's error.
func (s *Server) serve(ctx context.Context, t *tunnel.Tunnel, tk *ticket, id Identity, p *peer.Peer, cause *drainCause, lg logr.Logger) (end func() error) {
	hctx, cancel := context.WithTimeout(ctx, s.cfg.handshakeTimeout)
	r, err := t.Registration(hctx)
	cancel()
	if err != nil {
		tunnelsRefused.WithLabelValues("handshake").Inc()
		return func() error {
			t.Wait()
			return err
		}
	}
	reg := Registration{Name: r.GetName(), Version: r.GetVersion(), Services: r.GetServices(), Labels: r.GetLabels()}
	err = validate(reg)
	if err == nil {
		err = s.cfg.policy(ctx, id, reg)
	}
	// The registration's values are the peer's: quoted, cut, once valid.
	lg = lg.WithValues("plugin", quote(reg.Name), "version", quote(reg.Version), "user", quote(id.User))
	if err != nil {
		st := refusal(err)
		tunnelsRefused.WithLabelValues("registration").Inc()
		lg.Info("registration refused", "peer", peerKey(p), "code", st.Code(), "reason", quote(st.Message()))
		t.Reject(st)
		return func() error {
			t.Wait()
			return st.Err()
		}
	}
	inst := registry.Instance{
		ID:          fmt.Sprintf("%s-%d", reg.Name, s.nextID.Add(1)),
		Name:        reg.Name,
		Version:     reg.Version,
		Services:    reg.Services,
		Labels:      reg.Labels,
		Identity:    id.User,
		ConnectedAt: time.Now(),
	}
	// Listed before the plugin hears it is registered: Ready means callable.
	var remove func()
	t.Accept(inst.ID, func() { remove = s.reg.Add(inst, t) })
	tk.leave() // registered: no longer counts against the admission limits
	lg.Info("plugin registered", "instance", inst.ID, "services", inst.Services)
	stopLifetime := s.limitLifetime(t, id, cause, lg)            // security.go
	stopRevalidation := s.revalidate(ctx, t, id, reg, cause, lg) // security.go
	return func() error {
		<-t.Done()
		stopRevalidation()
		stopLifetime()
		remove()
		t.Wait()
		err := t.Err()
		lg.Info("plugin unregistered", "instance", inst.ID, "reason", endReason(err, cause))
		return err
	}
}

// endReason says in words why a registered tunnel ended.
func endReason(err error, cause *drainCause) string {
	why := cause.get()
	switch {
	case err == nil && why != "":
		return "drained by the operator: " + why
	case err == nil:
		return "drained by the plugin"
	case why != "":
		return why + "; then " + status.Convert(err).Message()
	}
	return status.Convert(err).Message()
}

func (s *Server) track(t *tunnel.Tunnel, c *drainCause) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.draining {
		return false
	}
	s.tunnels[t] = c
	return true
}

func (s *Server) untrack(t *tunnel.Tunnel) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.tunnels, t)
}

// Registration limits (spec 4.4), so that a peer cannot make the server
// hold or log large strings.
const (
	maxNameLen       = 253
	maxVersionLen    = 128
	maxServices      = 64
	maxServiceLen    = 253
	maxLabels        = 32
	maxLabelKeyLen   = 128
	maxLabelValueLen = 256
	quoteLen         = 64 // what an error message quotes of a value
)

// validate checks what every registration needs, whatever the policy.
func validate(r Registration) error {
	switch {
	case r.Name == "":
		return status.Error(codes.InvalidArgument, "plugin name is empty")
	case len(r.Name) > maxNameLen:
		return status.Errorf(codes.InvalidArgument, "plugin name is longer than %d characters", maxNameLen)
	case len(r.Version) > maxVersionLen:
		return status.Errorf(codes.InvalidArgument, "plugin version is longer than %d bytes", maxVersionLen)
	case len(r.Services) == 0:
		return status.Error(codes.InvalidArgument, "no service listed")
	case len(r.Services) > maxServices:
		return status.Errorf(codes.InvalidArgument, "more than %d services", maxServices)
	case len(r.Labels) > maxLabels:
		return status.Errorf(codes.InvalidArgument, "more than %d labels", maxLabels)
	}
	for _, svc := range r.Services {
		if svc == "" || len(svc) > maxServiceLen || strings.ContainsAny(svc, "/ ") {
			return status.Errorf(codes.InvalidArgument, "invalid service name %q", quote(svc))
		}
	}
	for k, v := range r.Labels {
		if k == "" || len(k) > maxLabelKeyLen || len(v) > maxLabelValueLen {
			return status.Errorf(codes.InvalidArgument, "invalid label %q", quote(k))
		}
	}
	return nil
}

// quote cuts a peer's value for an error message.
func quote(s string) string {
	if len(s) > quoteLen {
		return s[:quoteLen]
	}
	return s
}

// refusal is the status a policy error stands for.
func refusal(err error) *status.Status {
	if st, ok := status.FromError(err); ok {
		return st
	}
	return status.New(codes.PermissionDenied, err.Error())
}

func listen(addr string) (net.Listener, error) {
	network, address, err := target.ParseListen(addr)
	if err != nil {
		return nil, err
	}
	if network == "unix" {
		if err := removeStaleSocket(address); err != nil {
			return nil, err
		}
	}
	return net.Listen(network, address)
}

// removeStaleSocket removes a socket file left by a previous process, and
// refuses to touch one that a live server answers on or a non-socket file.
func removeStaleSocket(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if fi.Mode()&os.ModeSocket == 0 {
		return fmt.Errorf("%s exists and is not a socket", path)
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return fmt.Errorf("%s: address already in use", path)
	}
	return os.Remove(path)
}
