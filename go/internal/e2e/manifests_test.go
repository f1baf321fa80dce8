package e2e

import (
	"fmt"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"

	"github.com/guilhem/operator-plugin-framework/go/auth"
)

// configDir is the repository's config/ folder, or one of its variants.
func configDir(t testing.TB, variant string) string {
	t.Helper()
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		t.Fatal("cannot locate the test's source")
	}
	return filepath.Join(filepath.Dir(file), "..", "..", "..", "config", variant)
}

// manifests is what `kubectl kustomize` renders, decoded.
type manifests []*unstructured.Unstructured

// render runs kustomize (the library behind `kubectl kustomize`) on a
// variant of config/.
func render(t testing.TB, variant string) manifests {
	t.Helper()
	k := krusty.MakeKustomizer(krusty.MakeDefaultOptions())
	res, err := k.Run(filesys.MakeFsOnDisk(), configDir(t, variant))
	if err != nil {
		t.Fatalf("kustomize config/%s: %v", variant, err)
	}
	var out manifests
	for _, r := range res.Resources() {
		m, err := r.Map()
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, &unstructured.Unstructured{Object: m})
	}
	return out
}

// get decodes the object of this kind and name into into.
func (ms manifests) get(t testing.TB, kind, name string, into any) {
	t.Helper()
	for _, m := range ms {
		if m.GetKind() == kind && m.GetName() == name {
			b, err := yaml.Marshal(m.Object)
			if err != nil {
				t.Fatal(err)
			}
			if err := yaml.UnmarshalStrict(b, into); err != nil {
				t.Fatalf("%s %s: %v", kind, name, err)
			}
			return
		}
	}
	t.Fatalf("no %s %s in the manifests", kind, name)
}

func (ms manifests) has(kind, name string) bool {
	return slices.ContainsFunc(ms, func(m *unstructured.Unstructured) bool { return m.GetKind() == kind && m.GetName() == name })
}

func container(t testing.TB, d *appsv1.Deployment, name string) *corev1.Container {
	t.Helper()
	for i := range d.Spec.Template.Spec.Containers {
		if c := &d.Spec.Template.Spec.Containers[i]; c.Name == name {
			return c
		}
	}
	t.Fatalf("deployment %s has no container %s", d.Name, name)
	return nil
}

// flag returns the value of --name=value in args.
func flag(args []string, name string) (string, bool) {
	for _, a := range args {
		if v, ok := strings.CutPrefix(a, "--"+name+"="); ok {
			return v, true
		}
		if a == "--"+name {
			return "", true
		}
	}
	return "", false
}

// pluginAudience is the audience of the example plugin's projected token:
// the one the operator must accept.
func pluginAudience(t testing.TB, plugin manifests) string {
	t.Helper()
	var d appsv1.Deployment
	plugin.get(t, "Deployment", "example-plugin", &d)
	for _, v := range d.Spec.Template.Spec.Volumes {
		if v.Projected == nil {
			continue
		}
		for _, s := range v.Projected.Sources {
			if s.ServiceAccountToken != nil {
				return s.ServiceAccountToken.Audience
			}
		}
	}
	t.Fatal("the example plugin mounts no projected ServiceAccount token")
	return ""
}

// TestManifests renders every variant of config/ and checks that they say
// what the code and docs/security.md expect. It needs no cluster.
func TestManifests(t *testing.T) {
	plugin := render(t, "plugin")
	audience := pluginAudience(t, plugin)
	if audience == "" {
		t.Fatal("the plugin's token has no audience: the API server's own audience would be replayable here")
	}

	t.Run("rbac", func(t *testing.T) {
		rbac := render(t, "rbac")
		var serverRole rbacv1.ClusterRole
		rbac.get(t, "ClusterRole", "opf-plugin-server-auth", &serverRole)
		want := []rbacv1.PolicyRule{
			{APIGroups: []string{"authentication.k8s.io"}, Resources: []string{"tokenreviews"}, Verbs: []string{"create"}},
			{APIGroups: []string{"authorization.k8s.io"}, Resources: []string{"subjectaccessreviews"}, Verbs: []string{"create"}},
		}
		if !rulesEqual(serverRole.Rules, want) {
			t.Errorf("opf-plugin-server-auth rules %+v, want %+v", serverRole.Rules, want)
		}
		var binding rbacv1.ClusterRoleBinding
		rbac.get(t, "ClusterRoleBinding", "opf-plugin-server-auth", &binding)
		if binding.RoleRef.Name != "opf-plugin-server-auth" || len(binding.Subjects) != 1 || binding.Subjects[0].Name != "opf-operator" {
			t.Errorf("opf-plugin-server-auth binding %+v", binding)
		}
		var connect rbacv1.ClusterRole
		rbac.get(t, "ClusterRole", "opf-plugin-connect", &connect)
		want = []rbacv1.PolicyRule{{NonResourceURLs: []string{auth.ConnectPath}, Verbs: []string{auth.ConnectVerb}}}
		if !rulesEqual(connect.Rules, want) {
			t.Errorf("opf-plugin-connect rules %+v, want %+v", connect.Rules, want)
		}
	})

	t.Run("plugin", func(t *testing.T) {
		var register rbacv1.ClusterRole
		plugin.get(t, "ClusterRole", "opf-plugin-register-example-plugin", &register)
		want := []rbacv1.PolicyRule{{
			APIGroups: []string{auth.PluginsGroup}, Resources: []string{auth.PluginsResource},
			ResourceNames: []string{"example-plugin"}, Verbs: []string{auth.RegisterVerb},
		}}
		if !rulesEqual(register.Rules, want) {
			t.Errorf("register rules %+v, want %+v", register.Rules, want)
		}
		for binding, role := range map[string]string{
			"opf-plugin-connect-example-plugin":  "opf-plugin-connect",
			"opf-plugin-register-example-plugin": "opf-plugin-register-example-plugin",
		} {
			var b rbacv1.ClusterRoleBinding
			plugin.get(t, "ClusterRoleBinding", binding, &b)
			if b.RoleRef.Name != role || len(b.Subjects) != 1 || b.Subjects[0].Name != "example-plugin" || b.Subjects[0].Namespace != "example-plugin" {
				t.Errorf("binding of %s: %+v", role, b)
			}
		}
		var d appsv1.Deployment
		plugin.get(t, "Deployment", "example-plugin", &d)
		spec := d.Spec.Template.Spec
		if spec.ServiceAccountName != "example-plugin" || spec.AutomountServiceAccountToken == nil || *spec.AutomountServiceAccountToken {
			t.Errorf("plugin pod: service account %q, automount %v", spec.ServiceAccountName, spec.AutomountServiceAccountToken)
		}
		c := container(t, &d, "plugin")
		// Every operator replica, through the headless Service, each
		// verified against the ordinary Service's name.
		if v, _ := flag(c.Args, "operator"); v != "dns:///opf-plugin-server-headless.opf-system.svc:8443" {
			t.Errorf("plugin dials %q", v)
		}
		if v, _ := flag(c.Args, "server-name"); v != serverName {
			t.Errorf("plugin verifies the operator as %q, want %q", v, serverName)
		}
		checkResources(t, &d)
	})

	for _, variant := range []string{"builtin", "kube-rbac-proxy"} {
		t.Run(variant, func(t *testing.T) {
			ms := render(t, variant)
			for _, kind := range [][2]string{
				{"Namespace", "opf-system"}, {"ServiceAccount", "opf-operator"},
				{"ClusterRole", "opf-plugin-server-auth"}, {"ClusterRoleBinding", "opf-plugin-server-auth"},
				{"ClusterRole", "opf-plugin-connect"}, {"Service", "opf-plugin-server"},
				{"Service", "opf-plugin-server-headless"}, {"NetworkPolicy", "opf-plugin-server"},
			} {
				if !ms.has(kind[0], kind[1]) {
					t.Errorf("no %s %s", kind[0], kind[1])
				}
			}
			var d appsv1.Deployment
			ms.get(t, "Deployment", "opf-operator", &d)
			var svc corev1.Service
			ms.get(t, "Service", "opf-plugin-server", &svc)
			// The Service's named port exists on exactly one container.
			target := svc.Spec.Ports[0].TargetPort.String()
			var exposing []string
			for _, c := range d.Spec.Template.Spec.Containers {
				for _, p := range c.Ports {
					if p.Name == target {
						exposing = append(exposing, c.Name)
					}
				}
			}
			checkResources(t, &d)
			checkReplicas(t, &d)
			checkHeadless(t, ms, &svc)
			checkNetworkPolicy(t, ms, plugin, &d, target)
			manager := container(t, &d, "manager")
			addr, _ := flag(manager.Args, "plugin-server-address")
			switch variant {
			case "builtin":
				if !slices.Equal(exposing, []string{"manager"}) || len(d.Spec.Template.Spec.Containers) != 1 {
					t.Errorf("port %q exposed by %v", target, exposing)
				}
				if v, _ := flag(manager.Args, "plugin-token-audience"); v != audience {
					t.Errorf("operator audience %q, plugin token audience %q", v, audience)
				}
			case "kube-rbac-proxy":
				if !slices.Equal(exposing, []string{"kube-rbac-proxy"}) {
					t.Errorf("port %q exposed by %v", target, exposing)
				}
				if !strings.HasPrefix(addr, "127.0.0.1:") {
					t.Errorf("behind the proxy the server must listen on loopback, not %q", addr)
				}
				proxy := container(t, &d, "kube-rbac-proxy")
				// The server accepts only the proxy's user: no other
				// container may run as it.
				uid := runAsUser(t, &d, "kube-rbac-proxy")
				if v := env(manager, "PLUGIN_PROXY_UID"); v != fmt.Sprint(uid) {
					t.Errorf("PLUGIN_PROXY_UID=%q, the proxy runs as %d", v, uid)
				}
				for _, c := range d.Spec.Template.Spec.Containers {
					if c.Name != "kube-rbac-proxy" && runAsUser(t, &d, c.Name) == uid {
						t.Errorf("container %s runs as the proxy's user %d", c.Name, uid)
					}
				}
				checks := map[string]string{
					"upstream":                   "http://" + addr + "/",
					"upstream-force-h2c":         "",
					"auth-header-fields-enabled": "",
					"auth-token-audiences":       audience,
					"allow-paths":                auth.ConnectPath,
				}
				for name, want := range checks {
					if got, ok := flag(proxy.Args, name); !ok || got != want {
						t.Errorf("kube-rbac-proxy --%s=%q, want %q", name, got, want)
					}
				}
			}
		})
	}
}

func rulesEqual(a, b []rbacv1.PolicyRule) bool {
	return slices.EqualFunc(a, b, func(x, y rbacv1.PolicyRule) bool {
		return slices.Equal(x.APIGroups, y.APIGroups) && slices.Equal(x.Resources, y.Resources) &&
			slices.Equal(x.ResourceNames, y.ResourceNames) && slices.Equal(x.Verbs, y.Verbs) &&
			slices.Equal(x.NonResourceURLs, y.NonResourceURLs)
	})
}

// env is the value of a container's environment variable.
func env(c *corev1.Container, name string) string {
	for _, e := range c.Env {
		if e.Name == name {
			return e.Value
		}
	}
	return ""
}

// runAsUser is the user a container runs as, from its security context or
// the pod's; every container of ours sets one.
func runAsUser(t testing.TB, d *appsv1.Deployment, name string) int64 {
	t.Helper()
	if sc := container(t, d, name).SecurityContext; sc != nil && sc.RunAsUser != nil {
		return *sc.RunAsUser
	}
	if sc := d.Spec.Template.Spec.SecurityContext; sc != nil && sc.RunAsUser != nil {
		return *sc.RunAsUser
	}
	return -1
}

// checkResources: every container requests CPU and memory and has a
// memory limit.
func checkResources(t *testing.T, d *appsv1.Deployment) {
	t.Helper()
	for _, c := range d.Spec.Template.Spec.Containers {
		r := c.Resources
		if r.Requests.Cpu().IsZero() || r.Requests.Memory().IsZero() || r.Limits.Memory().IsZero() {
			t.Errorf("%s/%s: resources %+v, want CPU and memory requests and a memory limit", d.Name, c.Name, r)
		}
	}
}

// checkReplicas: the manager is told its pod name and how many replicas
// run, for server.WithReplica.
func checkReplicas(t *testing.T, d *appsv1.Deployment) {
	t.Helper()
	env := map[string]corev1.EnvVar{}
	for _, e := range container(t, d, "manager").Env {
		env[e.Name] = e
	}
	if e := env["POD_NAME"]; e.ValueFrom == nil || e.ValueFrom.FieldRef == nil || e.ValueFrom.FieldRef.FieldPath != "metadata.name" {
		t.Errorf("POD_NAME is %+v, want the downward API's metadata.name", e)
	}
	if d.Spec.Replicas == nil || env["OPERATOR_REPLICAS"].Value != fmt.Sprint(*d.Spec.Replicas) {
		t.Errorf("OPERATOR_REPLICAS=%q for %v replicas", env["OPERATOR_REPLICAS"].Value, d.Spec.Replicas)
	}
}

// checkHeadless: the headless Service selects what the Service selects, on
// the same port, reaching replicas that are not ready.
func checkHeadless(t *testing.T, ms manifests, svc *corev1.Service) {
	t.Helper()
	var h corev1.Service
	ms.get(t, "Service", "opf-plugin-server-headless", &h)
	if h.Spec.ClusterIP != corev1.ClusterIPNone || !h.Spec.PublishNotReadyAddresses {
		t.Errorf("headless Service: clusterIP %q, publishNotReadyAddresses %v", h.Spec.ClusterIP, h.Spec.PublishNotReadyAddresses)
	}
	if fmt.Sprint(h.Spec.Selector) != fmt.Sprint(svc.Spec.Selector) || len(h.Spec.Ports) != 1 ||
		h.Spec.Ports[0].Port != svc.Spec.Ports[0].Port || h.Spec.Ports[0].TargetPort != svc.Spec.Ports[0].TargetPort {
		t.Errorf("headless Service %+v does not match %+v", h.Spec, svc.Spec)
	}
}

// checkNetworkPolicy: the policy covers the operator's pods, and admits to
// the plugin port exactly the example plugin's pods.
func checkNetworkPolicy(t *testing.T, ms, plugin manifests, d *appsv1.Deployment, port string) {
	t.Helper()
	var np networkingv1.NetworkPolicy
	ms.get(t, "NetworkPolicy", "opf-plugin-server", &np)
	if !matches(np.Spec.PodSelector.MatchLabels, d.Spec.Template.Labels) || !slices.Equal(np.Spec.PolicyTypes, []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}) {
		t.Errorf("the NetworkPolicy selects %v for %v, not the operator's pods %v for ingress", np.Spec.PodSelector.MatchLabels, np.Spec.PolicyTypes, d.Spec.Template.Labels)
	}
	var pd appsv1.Deployment
	plugin.get(t, "Deployment", "example-plugin", &pd)
	var ns corev1.Namespace
	plugin.get(t, "Namespace", pd.Namespace, &ns)
	if len(np.Spec.Ingress) != 1 || len(np.Spec.Ingress[0].From) != 1 || len(np.Spec.Ingress[0].Ports) != 1 {
		t.Fatalf("NetworkPolicy ingress %+v, want one rule, one peer, one port", np.Spec.Ingress)
	}
	rule := np.Spec.Ingress[0]
	from := rule.From[0]
	if from.NamespaceSelector == nil || from.PodSelector == nil || len(from.NamespaceSelector.MatchLabels) == 0 || len(from.PodSelector.MatchLabels) == 0 ||
		!matches(from.NamespaceSelector.MatchLabels, ns.Labels) || !matches(from.PodSelector.MatchLabels, pd.Spec.Template.Labels) {
		t.Errorf("NetworkPolicy admits %+v, which is not the example plugin (namespace labels %v, pod labels %v)", from, ns.Labels, pd.Spec.Template.Labels)
	}
	if p := rule.Ports[0].Port; p == nil || p.String() != port {
		t.Errorf("NetworkPolicy opens port %v, want %s", p, port)
	}
}

// matches reports whether labels has every pair of selector.
func matches(selector, labels map[string]string) bool {
	for k, v := range selector {
		if labels[k] != v {
			return false
		}
	}
	return true
}
