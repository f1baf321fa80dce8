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
// identity in headers to the server on loopback h2c; ProxyHeaders trusts
// those headers from loopback peers only.
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
