package hostile

import (
	"context"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	authnv1 "k8s.io/api/authentication/v1"
	authzv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	"github.com/guilhem/operator-plugin-framework/go/auth"
	"github.com/guilhem/operator-plugin-framework/go/client"
)

const (
	testAudience = "hostile-test"
	testNS       = "hostile"
)

// apiServer is one envtest for the package, started by the first test
// that needs it and stopped by TestMain.
var apiServer struct {
	once       sync.Once
	env        *envtest.Environment
	cs         kubernetes.Interface
	kubeconfig string // the operator's ServiceAccount
	err        error
}

func stopAPIServer() {
	if apiServer.env != nil {
		_ = apiServer.env.Stop()
	}
	if apiServer.kubeconfig != "" {
		_ = os.RemoveAll(filepath.Dir(apiServer.kubeconfig))
	}
}

// startAPIServer returns a kubeconfig of a ServiceAccount allowed to
// create TokenReviews and SubjectAccessReviews, in a real API server; it
// skips the test when KUBEBUILDER_ASSETS is not set.
func startAPIServer(t *testing.T) string {
	t.Helper()
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		t.Skip("KUBEBUILDER_ASSETS is not set: run `go run mage.go e2e` from the repository root")
	}
	apiServer.once.Do(func() { apiServer.err = setUpAPIServer() })
	if apiServer.err != nil {
		t.Fatal(apiServer.err)
	}
	return apiServer.kubeconfig
}

func setUpAPIServer() error {
	env := &envtest.Environment{}
	cfg, err := env.Start()
	apiServer.env = env
	if err != nil {
		return err
	}
	cs := kubernetes.NewForConfigOrDie(cfg)
	apiServer.cs = cs
	ctx := context.Background()
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: testNS}}, metav1.CreateOptions{}); err != nil {
		return err
	}
	for _, sa := range []string{"operator", "plugin"} {
		if _, err := cs.CoreV1().ServiceAccounts(testNS).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{}); err != nil {
			return err
		}
	}
	subject := func(sa string) []rbacv1.Subject {
		return []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Name: sa, Namespace: testNS}}
	}
	if _, err := cs.RbacV1().ClusterRoles().Create(ctx, &rbacv1.ClusterRole{
		ObjectMeta: metav1.ObjectMeta{Name: "hostile-plugin"},
		Rules: []rbacv1.PolicyRule{
			{NonResourceURLs: []string{auth.ConnectPath}, Verbs: []string{auth.ConnectVerb}},
			{APIGroups: []string{auth.PluginsGroup}, Resources: []string{auth.PluginsResource}, ResourceNames: []string{"legit"}, Verbs: []string{auth.RegisterVerb}},
		},
	}, metav1.CreateOptions{}); err != nil {
		return err
	}
	for name, b := range map[string]rbacv1.ClusterRoleBinding{
		"hostile-operator": {RoleRef: rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: "system:auth-delegator"}, Subjects: subject("operator")},
		"hostile-plugin":   {RoleRef: rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: "hostile-plugin"}, Subjects: subject("plugin")},
	} {
		b.Name = name
		if _, err := cs.RbacV1().ClusterRoleBindings().Create(ctx, &b, metav1.CreateOptions{}); err != nil {
			return err
		}
	}
	tok, err := requestToken(cs, "operator")
	if err != nil {
		return err
	}
	kc := clientcmdapi.NewConfig()
	kc.Clusters["envtest"] = &clientcmdapi.Cluster{Server: cfg.Host, CertificateAuthorityData: cfg.CAData}
	kc.AuthInfos["operator"] = &clientcmdapi.AuthInfo{Token: tok}
	kc.Contexts["operator"] = &clientcmdapi.Context{Cluster: "envtest", AuthInfo: "operator"}
	kc.CurrentContext = "operator"
	dir, err := os.MkdirTemp("", "hostile")
	if err != nil {
		return err
	}
	apiServer.kubeconfig = filepath.Join(dir, "kubeconfig")
	if err := clientcmd.WriteToFile(*kc, apiServer.kubeconfig); err != nil {
		return err
	}
	// RBAC reaches the authorizer through an informer: wait for it.
	deadline := time.Now().Add(30 * time.Second)
	for _, spec := range []authzv1.SubjectAccessReviewSpec{
		{User: "system:serviceaccount:" + testNS + ":operator", ResourceAttributes: &authzv1.ResourceAttributes{Group: "authentication.k8s.io", Resource: "tokenreviews", Verb: "create"}},
		{User: "system:serviceaccount:" + testNS + ":plugin", ResourceAttributes: &authzv1.ResourceAttributes{Group: auth.PluginsGroup, Resource: auth.PluginsResource, Name: "legit", Verb: auth.RegisterVerb}},
	} {
		for {
			r, err := cs.AuthorizationV1().SubjectAccessReviews().Create(ctx, &authzv1.SubjectAccessReview{Spec: spec}, metav1.CreateOptions{})
			if err != nil {
				return err
			}
			if r.Status.Allowed {
				break
			}
			if time.Now().After(deadline) {
				return context.DeadlineExceeded
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	return nil
}

func requestToken(cs kubernetes.Interface, sa string, audiences ...string) (string, error) {
	r, err := cs.CoreV1().ServiceAccounts(testNS).CreateToken(context.Background(), sa, &authnv1.TokenRequest{
		Spec: authnv1.TokenRequestSpec{Audiences: audiences, ExpirationSeconds: new(int64(600))},
	}, metav1.CreateOptions{})
	if err != nil {
		return "", err
	}
	return r.Status.Token, nil
}

// pluginToken is a real token of the plugin's ServiceAccount for the
// operator's audience.
func pluginToken(t *testing.T) string {
	t.Helper()
	tok, err := requestToken(apiServer.cs, "plugin", testAudience)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// tokenOptions make a real plugin present the token in file, over
// loopback plaintext.
func tokenOptions(file string) []client.Option {
	return []client.Option{client.WithTokenFile(file), client.WithPlaintextToken()}
}
