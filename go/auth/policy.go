package auth

import (
	"context"
	"fmt"
	"slices"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	authzv1 "k8s.io/api/authorization/v1"

	"github.com/guilhem/operator-plugin-framework/go/server"
)

// RegistrationPolicy is the default policy of both modes: an identity may
// register a plugin under a name only if a SubjectAccessReview allows it
// the verb "register" on the virtual resource "plugins" of the API group
// PluginsGroup, with the plugin's name as resource name, in namespace
// (empty: cluster-wide, granted by a ClusterRoleBinding; a namespace lets a
// RoleBinding there grant it too). No such resource exists in the API: RBAC
// rules may name any resource, and this one exists only to be authorized.
//
//	rules:
//	  - apiGroups: ["pluginframework.guilhem.github.io"]
//	    resources: ["plugins"]
//	    resourceNames: ["my-plugin"]
//	    verbs: ["register"]
//
// A refusal is PERMISSION_DENIED, the plugin's tunnel is closed and plugins
// already registered under that name are untouched.
func RegistrationPolicy(authz *Authorizer, namespace string) server.RegistrationPolicy {
	return func(ctx context.Context, id server.Identity, reg server.Registration) error {
		if id.User == "" {
			return status.Error(codes.PermissionDenied, "anonymous callers may not register plugins")
		}
		d, err := authz.Authorize(ctx, id, Attributes{Resource: &authzv1.ResourceAttributes{
			Namespace: namespace,
			Verb:      RegisterVerb,
			Group:     PluginsGroup,
			Resource:  PluginsResource,
			Name:      reg.Name,
		}})
		if err != nil {
			return err
		}
		if !d.Allowed {
			what := fmt.Sprintf("register the plugin %q (verb %q on %s.%s named %q", reg.Name, RegisterVerb, PluginsResource, PluginsGroup, reg.Name)
			if namespace != "" {
				what += " in namespace " + namespace
			}
			return status.Error(codes.PermissionDenied, denied(id, what+")", d))
		}
		return nil
	}
}

// StaticPolicy allows each user the plugin names listed for it, for setups
// without RBAC for plugins: allowed maps a user name (for a ServiceAccount
// "system:serviceaccount:NAMESPACE:NAME") to the names it may register; the
// name "*" allows any. Everyone else is refused with PERMISSION_DENIED.
func StaticPolicy(allowed map[string][]string) server.RegistrationPolicy {
	m := make(map[string][]string, len(allowed))
	for u, names := range allowed {
		m[u] = slices.Clone(names)
	}
	return func(_ context.Context, id server.Identity, reg server.Registration) error {
		names := m[id.User]
		if id.User != "" && (slices.Contains(names, reg.Name) || slices.Contains(names, "*")) {
			return nil
		}
		return status.Errorf(codes.PermissionDenied, "%q may not register the plugin %q", id.User, reg.Name)
	}
}
