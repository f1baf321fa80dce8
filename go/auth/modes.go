package auth

import (
	"time"

	"k8s.io/client-go/kubernetes"

	"github.com/guilhem/operator-plugin-framework/go/server"
)

// Default maximum tunnel ages of the two modes (server.WithMaxTunnelAge;
// add another after these options to change it).
const (
	// BuiltInMaxTunnelAge bounds tunnels whose token carries no expiry
	// (AllowNonJWT); a ServiceAccount token's tunnel is drained before it
	// expires anyway.
	BuiltInMaxTunnelAge = time.Hour
	// ProxyMaxTunnelAge: behind the proxy the server never sees the token,
	// so this is how long a tunnel may outlive it. Keep it below the
	// plugins' token lifetime.
	ProxyMaxTunnelAge = 10 * time.Minute
)

// BuiltIn returns the server options of the built-in mode with default
// caches and limits: TokenReview of the bearer token for audiences, a
// SubjectAccessReview of the Connect path, RegistrationPolicy
// (cluster-wide), a maximum tunnel age of BuiltInMaxTunnelAge, and
// server.WithRequireTLS. kc acts as the operator's ServiceAccount, which
// needs "create" on tokenreviews and subjectaccessreviews. Combine them
// with server.WithTLS: over plaintext the plugins' tokens would travel in
// clear, so the server refuses to start on a TCP address that is not
// loopback without it (and the Go client refuses to send a token without
// TLS, except to a unix socket or loopback with client.WithPlaintextToken).
func BuiltIn(kc kubernetes.Interface, audiences []string) ([]server.Option, error) {
	tokens, err := NewTokenAuthenticator(kc.AuthenticationV1().TokenReviews(), TokenAuthenticatorConfig{Audiences: audiences})
	if err != nil {
		return nil, err
	}
	authz, err := NewAuthorizer(kc.AuthorizationV1().SubjectAccessReviews(), AuthorizerConfig{})
	if err != nil {
		return nil, err
	}
	return []server.Option{
		server.WithAuthenticator(AuthorizeConnect(tokens.Authenticate, authz)),
		server.WithRegistrationPolicy(RegistrationPolicy(authz, "")),
		server.WithMaxTunnelAge(BuiltInMaxTunnelAge),
		server.WithRequireTLS(),
	}, nil
}

// BehindKubeRBACProxy returns the server options of the sidecar mode with
// kube-rbac-proxy's default header names: the identity comes from the
// proxy's headers (ProxyHeaders), RegistrationPolicy (cluster-wide)
// decides the plugin names, tunnels live at most ProxyMaxTunnelAge, and
// only the proxy may connect (server.WithLocalProxy): serve on exactly
// "127.0.0.1:PORT" without TLS. Give the user id the proxy's container
// runs as with ProxyUID (its securityContext.runAsUser, which no other
// container of the pod should share): without it only the connection's
// addresses are checked, and any process of the pod can claim any
// identity by connecting from 127.0.0.1. kc acts as the operator's
// ServiceAccount, which needs "create" on subjectaccessreviews.
// docs/security.md says what is trusted, and why.
func BehindKubeRBACProxy(kc kubernetes.Interface, opts ...ProxyOption) ([]server.Option, error) {
	cfg := proxyConfig{uid: server.AnyUID}
	for _, o := range opts {
		o(&cfg)
	}
	authz, err := NewAuthorizer(kc.AuthorizationV1().SubjectAccessReviews(), AuthorizerConfig{})
	if err != nil {
		return nil, err
	}
	return []server.Option{
		server.WithAuthenticator(ProxyHeaders(ProxyHeadersConfig{})),
		server.WithRegistrationPolicy(RegistrationPolicy(authz, "")),
		server.WithLocalProxy(cfg.uid),
		server.WithMaxTunnelAge(ProxyMaxTunnelAge),
	}, nil
}

// ProxyOption configures BehindKubeRBACProxy.
type ProxyOption func(*proxyConfig)

type proxyConfig struct{ uid int }

// ProxyUID names the user kube-rbac-proxy runs as: the server accepts
// connections only from sockets of that user (server.WithLocalProxy).
func ProxyUID(uid int) ProxyOption {
	return func(c *proxyConfig) { c.uid = uid }
}
