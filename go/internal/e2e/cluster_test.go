package e2e

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	authnv1 "k8s.io/api/authentication/v1"
	authzv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	ctrlclient "sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	"github.com/guilhem/operator-plugin-framework/go/auth"
)

// Subjects, as config/ names them, and the test's own.
const (
	operatorNS   = "opf-system"
	operatorSA   = "opf-operator"
	pluginNS     = "example-plugin"
	pluginSA     = "example-plugin"
	pluginName   = "example-plugin"                                      // what config/plugin lets pluginSA register
	pluginUser   = "system:serviceaccount:example-plugin:example-plugin" // pluginSA as a user
	intruderSA   = "intruder"                                            // may connect, may not register pluginName
	noRBACSA     = "no-rbac"                                             // no binding at all
	tokenSeconds = 600                                                   // the shortest lifetime TokenRequest issues
)

// cluster is a real API server with config/'s RBAC applied.
type cluster struct {
	env       *envtest.Environment
	admin     *rest.Config
	cs        kubernetes.Interface
	rbacProxy string // path of the kube-rbac-proxy binary
	audience  string // what the plugin's projected token is issued for (config/plugin)
	saKey     crypto.Signer
	// operator acts as the operator's ServiceAccount, with a token of the
	// API server's audience, as in a pod.
	operator      *rest.Config
	operatorToken string
}

func startCluster(t testing.TB) *cluster {
	dir, rbacProxy := assets(t)
	start := time.Now()
	env := &envtest.Environment{BinaryAssetsDirectory: dir}
	cfg, err := env.Start()
	if err != nil {
		_ = env.Stop()
		t.Fatalf("start envtest: %v", err)
	}
	t.Cleanup(func() {
		if err := env.Stop(); err != nil {
			t.Errorf("stop envtest: %v", err)
		}
	})
	t.Logf("envtest (etcd, kube-apiserver) started in %s", time.Since(start).Round(time.Millisecond))
	c := &cluster{env: env, admin: cfg, cs: kubernetes.NewForConfigOrDie(cfg), rbacProxy: rbacProxy}

	// The key that signs ServiceAccount tokens, to forge an expired one.
	keyPEM, err := os.ReadFile(filepath.Join(env.ControlPlane.APIServer.CertDir, "sa-signer.key"))
	if err != nil {
		t.Fatalf("service account signing key: %v", err)
	}
	block, _ := pem.Decode(keyPEM)
	if block == nil {
		t.Fatal("sa-signer.key: no PEM block")
	}
	key, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		t.Fatalf("sa-signer.key: %v", err)
	}
	c.saKey = key.(crypto.Signer)

	ctx := t.Context()
	// Everything RBAC in config/: the operator's and the example plugin's.
	plugin := render(t, "plugin")
	c.audience = pluginAudience(t, plugin)
	c.apply(t, ctx, render(t, "builtin"), plugin)
	// The test's own subjects.
	for _, sa := range []string{intruderSA, noRBACSA} {
		c.create(t, ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa, Namespace: pluginNS}})
	}
	c.create(t, ctx, &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "e2e-intruder-connect"},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: "opf-plugin-connect"},
		Subjects:   []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Name: intruderSA, Namespace: pluginNS}},
	})

	// The operator's identity: its ServiceAccount's token for the API server.
	c.operatorToken, _ = c.token(t, operatorNS, operatorSA)
	c.operator = &rest.Config{Host: cfg.Host, BearerToken: c.operatorToken, TLSClientConfig: rest.TLSClientConfig{CAData: cfg.CAData}}

	// RBAC reaches the authorizer through an informer: wait for it.
	sa := func(ns, name string) string { return "system:serviceaccount:" + ns + ":" + name }
	c.waitAllowed(t, ctx, sa(operatorNS, operatorSA), authzv1.SubjectAccessReviewSpec{ResourceAttributes: &authzv1.ResourceAttributes{Group: "authentication.k8s.io", Resource: "tokenreviews", Verb: "create"}})
	c.waitAllowed(t, ctx, sa(operatorNS, operatorSA), authzv1.SubjectAccessReviewSpec{ResourceAttributes: &authzv1.ResourceAttributes{Group: "authorization.k8s.io", Resource: "subjectaccessreviews", Verb: "create"}})
	connect := authzv1.SubjectAccessReviewSpec{NonResourceAttributes: &authzv1.NonResourceAttributes{Path: auth.ConnectPath, Verb: auth.ConnectVerb}}
	c.waitAllowed(t, ctx, pluginUser, connect)
	c.waitAllowed(t, ctx, sa(pluginNS, intruderSA), connect)
	c.waitAllowed(t, ctx, pluginUser, authzv1.SubjectAccessReviewSpec{ResourceAttributes: &authzv1.ResourceAttributes{
		Group: auth.PluginsGroup, Resource: auth.PluginsResource, Verb: auth.RegisterVerb, Name: pluginName,
	}})
	t.Logf("cluster ready in %s", time.Since(start).Round(time.Millisecond))
	return c
}

// apply creates the namespaces, ServiceAccounts and RBAC objects of the
// manifests (nothing runs pods here).
func (c *cluster) apply(t testing.TB, ctx context.Context, sets ...manifests) {
	t.Helper()
	cl, err := ctrlclient.New(c.admin, ctrlclient.Options{})
	if err != nil {
		t.Fatal(err)
	}
	order := []string{"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
	for _, kind := range order {
		for _, ms := range sets {
			for _, m := range ms {
				if m.GetKind() != kind {
					continue
				}
				obj := m.DeepCopy()
				if err := cl.Create(ctx, obj); err != nil && !strings.Contains(err.Error(), "already exists") {
					t.Fatalf("create %s %s: %v", kind, m.GetName(), err)
				}
			}
		}
	}
}

func (c *cluster) create(t testing.TB, ctx context.Context, obj ctrlclient.Object) {
	t.Helper()
	cl, err := ctrlclient.New(c.admin, ctrlclient.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := cl.Create(ctx, obj); err != nil {
		t.Fatalf("create %T %s: %v", obj, obj.GetName(), err)
	}
}

func (c *cluster) waitAllowed(t testing.TB, ctx context.Context, user string, spec authzv1.SubjectAccessReviewSpec) {
	t.Helper()
	spec.User = user
	spec.Groups = []string{"system:serviceaccounts", "system:authenticated"}
	deadline := time.Now().Add(30 * time.Second)
	for {
		r, err := c.cs.AuthorizationV1().SubjectAccessReviews().Create(ctx, &authzv1.SubjectAccessReview{Spec: spec}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if r.Status.Allowed {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("RBAC never allowed %s %+v", user, spec)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// token requests a token for a ServiceAccount with the TokenRequest API,
// for these audiences (none: the API server's own).
func (c *cluster) token(t testing.TB, ns, sa string, audiences ...string) (string, time.Time) {
	t.Helper()
	tok, exp, err := c.requestToken(ns, sa, audiences...)
	if err != nil {
		t.Fatal(err)
	}
	return tok, exp
}

// requestToken is token for other goroutines than the test's.
func (c *cluster) requestToken(ns, sa string, audiences ...string) (string, time.Time, error) {
	r, err := c.cs.CoreV1().ServiceAccounts(ns).CreateToken(context.Background(), sa, &authnv1.TokenRequest{
		Spec: authnv1.TokenRequestSpec{Audiences: audiences, ExpirationSeconds: new(int64(tokenSeconds))},
	}, metav1.CreateOptions{})
	if err != nil {
		return "", time.Time{}, fmt.Errorf("token for %s/%s: %w", ns, sa, err)
	}
	return r.Status.Token, r.Status.ExpirationTimestamp.Time, nil
}

// review asks the API server about a token, as the operator would.
func (c *cluster) review(t testing.TB, token string) authnv1.TokenReviewStatus {
	t.Helper()
	r, err := c.cs.AuthenticationV1().TokenReviews().Create(context.Background(), &authnv1.TokenReview{
		Spec: authnv1.TokenReviewSpec{Token: token, Audiences: []string{c.audience}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return r.Status
}

// jwtParts splits a token into its decoded header and claims.
func jwtParts(t testing.TB, token string) (header, claims map[string]any) {
	t.Helper()
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		t.Fatalf("not a JWT: %d parts", len(parts))
	}
	for i, into := range []*map[string]any{&header, &claims} {
		b, err := base64.RawURLEncoding.DecodeString(parts[i])
		if err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(b, into); err != nil {
			t.Fatal(err)
		}
	}
	return header, claims
}

func encodeSegment(t testing.TB, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return base64.RawURLEncoding.EncodeToString(b)
}

// resign signs a copy of a real token's claims, changed by edit, with the
// API server's own ServiceAccount key: a token the API server would
// accept but for what edit changed.
func (c *cluster) resign(t testing.TB, token string, edit func(claims map[string]any)) string {
	t.Helper()
	header, claims := jwtParts(t, token)
	edit(claims)
	signing := encodeSegment(t, header) + "." + encodeSegment(t, claims)
	digest := sha256.Sum256([]byte(signing))
	var sig []byte
	switch key := c.saKey.(type) {
	case *rsa.PrivateKey:
		var err error
		if sig, err = rsa.SignPKCS1v15(rand.Reader, key, crypto.SHA256, digest[:]); err != nil {
			t.Fatal(err)
		}
	case *ecdsa.PrivateKey:
		r, s, err := ecdsa.Sign(rand.Reader, key, digest[:])
		if err != nil {
			t.Fatal(err)
		}
		size := (key.Curve.Params().BitSize + 7) / 8
		sig = append(r.FillBytes(make([]byte, size)), s.FillBytes(make([]byte, size))...)
	default:
		t.Fatalf("unexpected signing key %T", c.saKey)
	}
	return signing + "." + base64.RawURLEncoding.EncodeToString(sig)
}

// tokens are the credentials the tests present.
type tokens struct {
	good, goodFile       string // the plugin's, for the operator's audience; and a file holding it
	goodExpiry           time.Time
	wrongAudience        string // the plugin's, for another audience
	apiAudience          string // the plugin's, for the API server (a pod's default token)
	tampered             string // good with its subject changed, signature kept
	expired              string // signed by the API server's key, expired an hour ago
	garbage              string
	intruder, noRBAC     string // valid tokens of the other ServiceAccounts
	intruderFile         string
	expiredReviewMessage string
}

func (c *cluster) tokens(t *testing.T) *tokens {
	tk := &tokens{garbage: "garbage"}
	tk.good, tk.goodExpiry = c.token(t, pluginNS, pluginSA, c.audience)
	tk.wrongAudience, _ = c.token(t, pluginNS, pluginSA, "some-other-service")
	tk.apiAudience, _ = c.token(t, pluginNS, pluginSA)
	tk.intruder, _ = c.token(t, pluginNS, intruderSA, c.audience)
	tk.noRBAC, _ = c.token(t, pluginNS, noRBACSA, c.audience)

	// Tampered: another subject, the original signature.
	h, claims := jwtParts(t, tk.good)
	claims["sub"] = "system:serviceaccount:" + pluginNS + ":" + intruderSA
	parts := strings.Split(tk.good, ".")
	tk.tampered = encodeSegment(t, h) + "." + encodeSegment(t, claims) + "." + parts[2]

	// Expired: re-signed with the API server's key. The same claims with a
	// future expiry are accepted (so the signature is right) and the
	// expired ones are refused for their expiry alone.
	now := time.Now().Unix()
	shift := func(exp int64) func(map[string]any) {
		return func(cl map[string]any) {
			cl["iat"], cl["nbf"], cl["exp"] = exp-tokenSeconds, exp-tokenSeconds, exp
		}
	}
	if st := c.review(t, c.resign(t, tk.good, shift(now+tokenSeconds))); !st.Authenticated {
		t.Fatalf("a re-signed token is refused (%s): the forged expired token would prove nothing", st.Error)
	}
	tk.expired = c.resign(t, tk.good, shift(now-3600))
	st := c.review(t, tk.expired)
	if st.Authenticated {
		t.Fatal("the API server accepts an expired token")
	}
	tk.expiredReviewMessage = st.Error
	t.Logf("expired token refused by the API server: %s", st.Error)

	dir := t.TempDir()
	tk.goodFile, tk.intruderFile = filepath.Join(dir, "token"), filepath.Join(dir, "intruder-token")
	for path, v := range map[string]string{tk.goodFile: tk.good, tk.intruderFile: tk.intruder} {
		if err := os.WriteFile(path, []byte(v), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return tk
}

// kubeconfigIn writes a kubeconfig for the operator's ServiceAccount, for
// kube-rbac-proxy (in a pod it would use the in-cluster configuration), in
// dir, readable by every user (the proxy runs as a user of its own).
func (c *cluster) kubeconfigIn(t testing.TB, dir string) string {
	t.Helper()
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["envtest"] = &clientcmdapi.Cluster{Server: c.admin.Host, CertificateAuthorityData: c.admin.CAData}
	cfg.AuthInfos["operator"] = &clientcmdapi.AuthInfo{Token: c.operatorToken}
	cfg.Contexts["operator"] = &clientcmdapi.Context{Cluster: "envtest", AuthInfo: "operator"}
	cfg.CurrentContext = "operator"
	path := filepath.Join(dir, "kubeconfig")
	if err := clientcmd.WriteToFile(*cfg, path); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}
