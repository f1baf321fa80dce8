// Package auth authenticates and authorizes plugin tunnels the Kubernetes
// way, for an operator that embeds the plugin server (package server).
//
// # Two modes
//
// Built in (BuiltIn): the server serves TLS itself (server.WithTLS) and
// checks each tunnel's bearer token, a projected ServiceAccount token, with
// the TokenReview API for pinned audiences (TokenAuthenticator), then asks
// a SubjectAccessReview whether the caller may "create" the non-resource
// path ConnectPath (AuthorizeConnect). No sidecar is needed; the operator's
// ServiceAccount needs "create" on tokenreviews and subjectaccessreviews.
//
// Behind kube-rbac-proxy (BehindKubeRBACProxy): the proxy terminates TLS,
// reviews the token and authorizes the same path, and forwards the caller's
// identity in headers to the server on loopback h2c; the server accepts
// connections only from the proxy (its address and, with ProxyUID, the
// user its socket belongs to: server.WithLocalProxy), and ProxyHeaders
// trusts the headers from such a peer only.
//
// # Load on the API server
//
// Whatever peers send, the reviews they make the operator ask for are
// bounded (ReviewLimits): tokens that cannot pass are refused before any
// review (not a JWT for our audiences, or expired), concurrent reviews of
// one token or access question are one, each has a deadline, and at most
// so many run at once and start each second, in all and per peer address.
// Registered tunnels are reviewed again every minute (the server's
// revalidation), outside the rate limits.
//
// # Which plugin names an identity may register
//
// In both modes a RegistrationPolicy binds plugin names to identities. The
// default (RegistrationPolicy) lets RBAC decide, with a SubjectAccessReview
// of the verb "register" on the virtual resource "plugins" of the API
// group PluginsGroup, named after the plugin. StaticPolicy is a fixed map
// for simple setups.
//
// # Token lifetime
//
// TokenAuthenticator reads the token's expiry (TokenExpiry) once the API
// server has accepted it, into server.Identity.ExpiresAt; the server drains
// the tunnel before then (server.WithTokenExpiryMargin) and the plugin
// reconnects with the token its file holds by then. Behind the proxy the
// token is not seen: bound tunnels with server.WithMaxTunnelAge.
//
// docs/security.md has the threat model and the manifests in config/.
package auth

const (
	// ConnectPath is the HTTP path of the tunnel's gRPC method: the
	// non-resource URL that RBAC must allow, with ConnectVerb, for a plugin
	// to connect.
	ConnectPath = "/pluginframework.v1.PluginFrameworkService/Connect"
	// ConnectVerb is the verb of a gRPC call, an HTTP POST, as
	// kube-rbac-proxy and AuthorizeConnect ask it.
	ConnectVerb = "create"

	// PluginsGroup is the API group of the virtual "plugins" resource that
	// RegistrationPolicy authorizes. Nothing serves it.
	PluginsGroup = "pluginframework.guilhem.github.io"
	// PluginsResource is the virtual resource; the resource name is the
	// plugin's name.
	PluginsResource = "plugins"
	// RegisterVerb is the verb RegistrationPolicy asks for.
	RegisterVerb = "register"
)
