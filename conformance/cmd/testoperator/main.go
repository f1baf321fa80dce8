// Command testoperator is an operator for the tests of plugin SDKs in other
// languages: it runs the framework's Go server (go/server) for plugins, and
// a plain gRPC server, the proxy, that forwards every call it receives to a
// plugin through the tunnel, so that a test calls its plugin with ordinary
// generated stubs and sees what an operator's reconciler sees: metadata,
// deadlines, cancellation, status details and all four RPC kinds.
//
//	testoperator -listen unix:///tmp/t/op.sock -proxy unix:///tmp/t/proxy.sock
//
// A call to the proxy goes to the plugin named by its "x-opf-plugin"
// metadata (not forwarded), or by -plugin. It waits for an instance of the
// plugin to register, within the call's deadline.
//
// Standard output carries one JSON object per line: {"event":"ready"} once
// both servers listen, then {"event":"registered"|"unregistered",
// "plugin":..., "instance":..., "version":..., "services":[...],
// "labels":{...}} for each instance. Logs go to standard error. SIGTERM or
// SIGINT drains the server (plugins get GoAway) and exits with status 0.
// -replica-id and -replica-count set what its Hello announces (docs/tunnel-spec.md
// 4.7); -reject refuses every registration with a status.
package main

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/go-logr/logr/funcr"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"sigs.k8s.io/controller-runtime/pkg/log"

	"github.com/guilhem/operator-plugin-framework/go/registry"
	"github.com/guilhem/operator-plugin-framework/go/server"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "testoperator:", err)
		os.Exit(1)
	}
}

func run() error {
	listen := flag.String("listen", "", "address plugins connect to (unix:///path or host:port)")
	proxyAddr := flag.String("proxy", "", "address of the proxy that forwards calls to plugins (unix:///path or host:port)")
	plugin := flag.String("plugin", "", "plugin to call when a call has no x-opf-plugin metadata")
	token := flag.String("token", "", "bearer token plugins must send (default: none required)")
	certFile := flag.String("tls-cert", "", "serve plugins over TLS with this certificate (PEM)")
	keyFile := flag.String("tls-key", "", "private key of -tls-cert (PEM)")
	heartbeat := flag.Duration("heartbeat", 0, "heartbeat interval (default: the server's)")
	drain := flag.Duration("drain-timeout", 0, "drain timeout on shutdown (default: the server's)")
	maxMsg := flag.Int("max-message-size", 0, "largest response accepted from plugins (default: the server's)")
	replicaID := flag.String("replica-id", "", "this operator's replica id (default: the server's, host name and a random suffix)")
	replicaCount := flag.Int("replica-count", 0, "how many replicas the operator announces (0: unknown)")
	reject := flag.String("reject", "", "refuse every registration with this status, CODE:MESSAGE (CODE a gRPC code name such as PERMISSION_DENIED)")
	verbose := flag.Int("v", 0, "log verbosity")
	flag.Parse()
	if *listen == "" || *proxyAddr == "" {
		return errors.New("-listen and -proxy are required")
	}

	logger := funcr.New(func(prefix, args string) {
		fmt.Fprintln(os.Stderr, time.Now().Format("15:04:05.000"), prefix, args)
	}, funcr.Options{Verbosity: *verbose})
	log.SetLogger(logger)

	opts := []server.Option{}
	if *token != "" {
		opts = append(opts, server.WithAuthenticator(bearer(*token)))
	} else {
		opts = append(opts, server.WithInsecureNoAuthentication()) // a test operator, on loopback
	}
	if *certFile != "" {
		opts = append(opts, server.WithTLS(*certFile, *keyFile))
	}
	if *heartbeat > 0 {
		opts = append(opts, server.WithHeartbeatInterval(*heartbeat))
	}
	if *drain > 0 {
		opts = append(opts, server.WithDrainTimeout(*drain))
	}
	if *maxMsg > 0 {
		opts = append(opts, server.WithMaxMessageSize(*maxMsg))
	}
	if *replicaID != "" || *replicaCount > 0 {
		opts = append(opts, server.WithReplica(*replicaID, *replicaCount))
	}
	if *reject != "" {
		st, err := parseStatus(*reject)
		if err != nil {
			return err
		}
		opts = append(opts, server.WithRegistrationPolicy(func(context.Context, server.Identity, server.Registration) error { return st.Err() }))
	}
	srv, err := server.New(*listen, opts...)
	if err != nil {
		return err
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	sctx, cancel := context.WithCancel(log.IntoContext(context.Background(), logger))
	defer cancel()
	served := make(chan error, 1)
	go func() { served <- srv.Start(sctx) }()
	actx, acancel := context.WithTimeout(ctx, 10*time.Second)
	_, err = srv.Addr(actx)
	acancel()
	if err != nil {
		return fmt.Errorf("plugin server: %w", err)
	}

	lis, err := listenProxy(*proxyAddr)
	if err != nil {
		return err
	}
	p := &proxy{reg: srv.GetRegistry(), plugin: *plugin}
	// The proxy lets any size through: the tunnel's limits are what a test checks.
	gs := grpc.NewServer(grpc.ForceServerCodecV2(rawCodec{}), grpc.UnknownServiceHandler(p.handle),
		grpc.MaxRecvMsgSize(1<<30), grpc.MaxSendMsgSize(1<<30))
	go gs.Serve(lis) //nolint:errcheck // ends with Stop below

	out := &events{enc: json.NewEncoder(os.Stdout)}
	wctx, wcancel := context.WithCancel(context.Background())
	defer wcancel()
	watched := make(chan struct{})
	go func() {
		defer close(watched)
		for ev := range srv.GetRegistry().Watch(wctx) {
			out.instance(ev)
		}
	}()
	out.write(map[string]any{"event": "ready"})

	select {
	case <-ctx.Done():
	case err := <-served:
		gs.Stop()
		return err
	}
	cancel() // drains the plugin server
	err = <-served
	gs.Stop()
	wcancel()
	<-watched
	return err
}

// parseStatus reads CODE:MESSAGE.
func parseStatus(s string) (*status.Status, error) {
	name, msg, _ := strings.Cut(s, ":")
	for c := codes.OK + 1; c <= codes.Unauthenticated; c++ {
		if strings.EqualFold(strings.ReplaceAll(c.String(), "_", ""), strings.ReplaceAll(name, "_", "")) {
			return status.New(c, msg), nil
		}
	}
	return nil, fmt.Errorf("-reject %q: no gRPC code named %q", s, name)
}

// bearer accepts the Connect calls that carry the expected token.
func bearer(token string) server.Authenticator {
	want := "Bearer " + token
	return func(ctx context.Context) (server.Identity, error) {
		md, _ := metadata.FromIncomingContext(ctx)
		got := md.Get("authorization")
		if len(got) != 1 || subtle.ConstantTimeCompare([]byte(got[0]), []byte(want)) != 1 {
			return server.Identity{}, status.Error(codes.Unauthenticated, "missing or wrong bearer token")
		}
		return server.Identity{User: "test-plugin"}, nil
	}
}

func listenProxy(addr string) (net.Listener, error) {
	if path, ok := strings.CutPrefix(addr, "unix://"); ok {
		_ = os.Remove(path)
		return net.Listen("unix", path)
	}
	return net.Listen("tcp", addr)
}

// events writes the JSON lines of standard output.
type events struct {
	mu  sync.Mutex
	enc *json.Encoder
}

func (e *events) write(v any) {
	e.mu.Lock()
	defer e.mu.Unlock()
	_ = e.enc.Encode(v)
}

func (e *events) instance(ev registry.Event) {
	e.write(map[string]any{
		"event":    strings.ToLower(ev.Type.String()),
		"plugin":   ev.Instance.Name,
		"instance": ev.Instance.ID,
		"version":  ev.Instance.Version,
		"services": ev.Instance.Services,
		"labels":   ev.Instance.Labels,
	})
}

// pluginHeader names the plugin a proxied call goes to.
const pluginHeader = "x-opf-plugin"

// proxy forwards any call, message by message and without decoding, to a
// plugin through the registry.
type proxy struct {
	reg    *registry.Registry
	plugin string
}

func (p *proxy) handle(_ any, ss grpc.ServerStream) error {
	method, _ := grpc.MethodFromServerStream(ss)
	md, _ := metadata.FromIncomingContext(ss.Context())
	md = md.Copy()
	name := p.plugin
	if v := md.Get(pluginHeader); len(v) > 0 {
		name = v[0]
	}
	md.Delete(pluginHeader)
	if name == "" {
		return status.Errorf(codes.InvalidArgument, "no plugin named: set the %s metadata or -plugin", pluginHeader)
	}
	ctx, cancel := context.WithCancel(metadata.NewOutgoingContext(ss.Context(), md))
	defer cancel()
	desc := &grpc.StreamDesc{ClientStreams: true, ServerStreams: true}
	cs, err := p.reg.Plugin(name).NewStream(ctx, desc, method, grpc.ForceCodecV2(rawCodec{}), grpc.WaitForReady(true))
	if err != nil {
		return err
	}
	// Requests: caller to plugin, until the caller half-closes. A failure
	// here ends with the call's status, which RecvMsg below reports.
	go func() {
		for {
			var m rawMessage
			if err := ss.RecvMsg(&m); err != nil {
				if errors.Is(err, io.EOF) {
					_ = cs.CloseSend()
				} else {
					cancel()
				}
				return
			}
			if err := cs.SendMsg(&m); err != nil {
				return
			}
		}
	}()
	// Responses: plugin to caller, then the status and trailers.
	if h, err := cs.Header(); err == nil && len(h) > 0 {
		if err := ss.SendHeader(h); err != nil {
			return err
		}
	}
	for {
		var m rawMessage
		if err := cs.RecvMsg(&m); err != nil {
			ss.SetTrailer(cs.Trailer())
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		if err := ss.SendMsg(&m); err != nil {
			return err
		}
	}
}

// rawMessage is a message as bytes, undecoded.
type rawMessage struct{ data []byte }

// rawCodec passes messages through as bytes. It is named "proto" because
// the messages are protobuf, which is all the tunnel carries.
type rawCodec struct{}

func (rawCodec) Name() string { return "proto" }

func (rawCodec) Marshal(v any) (mem.BufferSlice, error) {
	m, ok := v.(*rawMessage)
	if !ok {
		return nil, fmt.Errorf("rawCodec: cannot marshal %T", v)
	}
	return mem.BufferSlice{mem.SliceBuffer(m.data)}, nil
}

func (rawCodec) Unmarshal(data mem.BufferSlice, v any) error {
	m, ok := v.(*rawMessage)
	if !ok {
		return fmt.Errorf("rawCodec: cannot unmarshal into %T", v)
	}
	m.data = data.Materialize()
	return nil
}
