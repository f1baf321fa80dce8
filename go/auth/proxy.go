package auth

import (
	"context"
	"net"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/guilhem/operator-plugin-framework/go/server"
)

// ProxyHeadersConfig names the headers kube-rbac-proxy sets. The zero
// value matches kube-rbac-proxy's defaults.
type ProxyHeadersConfig struct {
	// UserHeader is --auth-header-user-field-name. Default "x-remote-user".
	UserHeader string
	// GroupsHeader is --auth-header-groups-field-name. Default
	// "x-remote-groups".
	GroupsHeader string
	// GroupSeparator is --auth-header-groups-field-separator. Default "|".
	GroupSeparator string
}

// ProxyHeaders identifies the caller of a tunnel from the identity headers
// kube-rbac-proxy adds once it has authenticated and authorized the
// caller's token (run it with --auth-header-fields-enabled, which also
// overwrites any such header the caller sent).
//
// The headers are trusted only from a loopback TCP peer whose address is
// the server's own (the proxy dials 127.0.0.1 from 127.0.0.1; another
// process can choose 127.0.0.6): the sidecar in the operator's own pod,
// with the server listening on 127.0.0.1 as h2c. Any other peer is
// refused, and so is such a peer without the user header; both with
// UNAUTHENTICATED. That alone does not tell the proxy from another process
// of the pod: server.WithLocalProxy, which BehindKubeRBACProxy sets, also
// checks the user the connection's socket belongs to (docs/security.md).
//
// The proxy does not forward the token, so the identity carries no expiry:
// bound tunnels with server.WithMaxTunnelAge.
func ProxyHeaders(cfg ProxyHeadersConfig) server.Authenticator {
	userH := strings.ToLower(orDefaultString(cfg.UserHeader, "x-remote-user"))
	groupsH := strings.ToLower(orDefaultString(cfg.GroupsHeader, "x-remote-groups"))
	sep := orDefaultString(cfg.GroupSeparator, "|")
	return func(ctx context.Context) (server.Identity, error) {
		p, _ := peer.FromContext(ctx)
		if p == nil || !fromOwnAddress(p) {
			return server.Identity{}, status.Error(codes.Unauthenticated, "identity headers are accepted only from kube-rbac-proxy on the server's loopback address")
		}
		md, _ := metadata.FromIncomingContext(ctx)
		users := md.Get(userH)
		if len(users) != 1 || users[0] == "" {
			return server.Identity{}, status.Errorf(codes.Unauthenticated, "no single %s header: is kube-rbac-proxy running with --auth-header-fields-enabled?", userH)
		}
		id := server.Identity{User: users[0], Peer: p}
		for _, v := range md.Get(groupsH) {
			for g := range strings.SplitSeq(v, sep) {
				if g != "" {
					id.Groups = append(id.Groups, g)
				}
			}
		}
		return id, nil
	}
}

func orDefaultString(v, def string) string {
	if v == "" {
		return def
	}
	return v
}

// fromOwnAddress reports a TCP peer on loopback whose address is the one
// it connected to.
func fromOwnAddress(p *peer.Peer) bool {
	remote, ok := p.Addr.(*net.TCPAddr)
	if !ok || !remote.IP.IsLoopback() {
		return false
	}
	local, ok := p.LocalAddr.(*net.TCPAddr)
	return ok && local.IP.Equal(remote.IP)
}
