package auth

import (
	"k8s.io/client-go/kubernetes"

	"github.com/guilhem/operator-plugin-framework/go/server"
)

// BuiltIn returns the server options of the built-in mode with default
// caches: TokenReview of the bearer token for audiences, a
// SubjectAccessReview of the Connect path, and RegistrationPolicy
// (cluster-wide). kc acts as the operator's ServiceAccount, which needs
// "create" on tokenreviews and subjectaccessreviews. Combine them with
// server.WithTLS: over plaintext the plugins' tokens would travel in clear
// (the Go client refuses to send them so, except to a unix socket or
// loopback with client.WithPlaintextToken).
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
	}, nil
}

// BehindKubeRBACProxy returns the server options of the sidecar mode with
// kube-rbac-proxy's default header names: the identity comes from the
// proxy's headers (loopback peers only, ProxyHeaders) and
// RegistrationPolicy (cluster-wide) decides the plugin names. kc acts as
// the operator's ServiceAccount, which needs "create" on
// subjectaccessreviews. Serve on a loopback address ("127.0.0.1:PORT")
// without TLS, and add server.WithMaxTunnelAge.
func BehindKubeRBACProxy(kc kubernetes.Interface) ([]server.Option, error) {
	authz, err := NewAuthorizer(kc.AuthorizationV1().SubjectAccessReviews(), AuthorizerConfig{})
	if err != nil {
		return nil, err
	}
	return []server.Option{
		server.WithAuthenticator(ProxyHeaders(ProxyHeadersConfig{})),
		server.WithRegistrationPolicy(RegistrationPolicy(authz, "")),
	}, nil
}
