package server

import (
	"context"
	"sync/atomic"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/guilhem/operator-plugin-framework/go/internal/tunnel"
	"github.com/guilhem/operator-plugin-framework/go/registry"
)

// handoffConn is a tunnel as the registry holds it. The registry picks a
// tunnel that accepts calls, then opens the call on it; a drain (a GoAway
// sent at the tunnel's maximum age or before its credentials expire) can
// come in between, and the tunnel then refuses the call before sending any
// of it. Such a call is handed back to the registry, which picks another
// instance (or waits for one, with grpc.WaitForReady), instead of failing
// with UNAVAILABLE: reconnections the server asks for lose no call.
type handoffConn struct {
	*tunnel.Tunnel
	plugin *registry.PluginProvider
}

var _ registry.Conn = (*handoffConn)(nil)

func (s *Server) handoff(name string, t *tunnel.Tunnel) *handoffConn {
	return &handoffConn{Tunnel: t, plugin: s.reg.Plugin(name)}
}

func (c *handoffConn) Invoke(ctx context.Context, method string, args, reply any, opts ...grpc.CallOption) error {
	// A call that was opened always finishes; one refused before it was
	// opened does not.
	var opened atomic.Bool
	sent := append(opts[:len(opts):len(opts)], grpc.OnFinish(func(error) { opened.Store(true) }))
	err := c.Tunnel.Invoke(ctx, method, args, reply, sent...)
	if err != nil && !opened.Load() && c.refused(err) {
		return c.plugin.Invoke(ctx, method, args, reply, opts...)
	}
	return err
}

func (c *handoffConn) NewStream(ctx context.Context, desc *grpc.StreamDesc, method string, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	// An error here means the call was not opened: once it is, errors come
	// from the stream.
	cs, err := c.Tunnel.NewStream(ctx, desc, method, opts...)
	if err != nil && c.refused(err) {
		return c.plugin.NewStream(ctx, desc, method, opts...)
	}
	return cs, err
}

// refused reports whether err is the tunnel turning a call away because it
// no longer accepts calls; the registry does not pick it again.
func (c *handoffConn) refused(err error) bool {
	return status.Code(err) == codes.Unavailable && !c.Tunnel.Accepting()
}
