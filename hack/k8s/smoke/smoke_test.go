// Package smoke proves that the Kubernetes binaries built by
// `go run mage.go k8s:binaries` work together: envtest runs on the built
// etcd and kube-apiserver, service account tokens can be requested and
// reviewed, and the built kube-rbac-proxy authenticates and authorizes
// requests to an HTTP/2-cleartext (h2c) server behind it.
//
// Run it with `go run mage.go k8s:smoke`, or from this folder with
// `GOWORK=off KUBEBUILDER_ASSETS=<repo>/.cache/k8s/bin go test -v .`.
package smoke

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
	"time"

	authnv1 "k8s.io/api/authentication/v1"
	authzv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
)

const (
	namespace   = "default"
	saName      = "smoke"
	saUser      = "system:serviceaccount:" + namespace + ":" + saName
	audience    = "smoke.operator-plugin-framework"
	proxyUser   = "kube-rbac-proxy"
	allowedPath = "/allowed" // RBAC grants the service account "create" (POST) here
	deniedPath  = "/denied"  // and nowhere else
)

func TestKubernetesBinaries(t *testing.T) {
	assets := assetsDir(t)

	// envtest: etcd and kube-apiserver from the bin folder.
	start := time.Now()
	env := &envtest.Environment{BinaryAssetsDirectory: assets}
	cfg, err := env.Start()
	if err != nil {
		_ = env.Stop() // whatever did start
		t.Fatalf("start envtest: %v", err)
	}
	t.Logf("envtest started in %s", time.Since(start).Round(time.Millisecond))
	t.Cleanup(func() {
		start := time.Now()
		if err := env.Stop(); err != nil {
			t.Errorf("stop envtest: %v", err)
		}
		t.Logf("envtest stopped in %s", time.Since(start).Round(time.Millisecond))
	})

	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	cs := kubernetes.NewForConfigOrDie(cfg)
	if v, err := cs.Discovery().ServerVersion(); err != nil {
		t.Fatalf("server version: %v", err)
	} else {
		t.Logf("kube-apiserver %s", v.GitVersion)
	}

	// A service account and a token for it, bound to an audience.
	mustCreate(t, func() error {
		_, err := cs.CoreV1().ServiceAccounts(namespace).Create(ctx,
			&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: saName}}, metav1.CreateOptions{})
		return err
	})
	tr, err := cs.CoreV1().ServiceAccounts(namespace).CreateToken(ctx, saName, &authnv1.TokenRequest{
		Spec: authnv1.TokenRequestSpec{Audiences: []string{audience}, ExpirationSeconds: new(int64(600))},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("request token: %v", err)
	}
	token := tr.Status.Token

	// TokenReview: valid for its audience, not for another one.
	review := func(aud string) *authnv1.TokenReviewStatus {
		r, err := cs.AuthenticationV1().TokenReviews().Create(ctx, &authnv1.TokenReview{
			Spec: authnv1.TokenReviewSpec{Token: token, Audiences: []string{aud}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatalf("token review: %v", err)
		}
		return &r.Status
	}
	st := review(audience)
	if !st.Authenticated || st.User.Username != saUser || !slices.Contains(st.Audiences, audience) {
		t.Fatalf("token review: got %+v, want %s authenticated for %s", st, saUser, audience)
	}
	if other := review("another-audience"); other.Authenticated {
		t.Fatalf("token review with another audience: got authenticated")
	}

	// RBAC: POST (verb "create") on allowedPath for the service account, and
	// what kube-rbac-proxy needs for its TokenReviews and SubjectAccessReviews.
	mustCreate(t, func() error {
		_, err := cs.RbacV1().ClusterRoles().Create(ctx, &rbacv1.ClusterRole{
			ObjectMeta: metav1.ObjectMeta{Name: "smoke-caller"},
			Rules:      []rbacv1.PolicyRule{{NonResourceURLs: []string{allowedPath}, Verbs: []string{"create"}}},
		}, metav1.CreateOptions{})
		return err
	})
	bind(t, ctx, cs, "smoke-caller", "smoke-caller",
		rbacv1.Subject{Kind: rbacv1.ServiceAccountKind, Name: saName, Namespace: namespace})
	bind(t, ctx, cs, "smoke-proxy", "system:auth-delegator",
		rbacv1.Subject{Kind: rbacv1.UserKind, APIGroup: rbacv1.GroupName, Name: proxyUser})

	// SubjectAccessReview, as kube-rbac-proxy will ask it. RBAC reaches the
	// authorizer through an informer, so wait for it.
	sar := func(path string) bool {
		r, err := cs.AuthorizationV1().SubjectAccessReviews().Create(ctx, &authzv1.SubjectAccessReview{
			Spec: authzv1.SubjectAccessReviewSpec{
				User: st.User.Username, UID: st.User.UID, Groups: st.User.Groups,
				NonResourceAttributes: &authzv1.NonResourceAttributes{Path: path, Verb: "create"},
			},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatalf("subject access review: %v", err)
		}
		return r.Status.Allowed
	}
	eventually(t, ctx, "subject access review allows "+allowedPath, func() bool { return sar(allowedPath) })
	if sar(deniedPath) {
		t.Fatalf("subject access review: %s allowed, want denied", deniedPath)
	}

	// kube-rbac-proxy, as its own user, in front of an h2c server.
	upstream := startUpstream(t)
	proxyUserCfg, err := env.AddUser(envtest.User{Name: proxyUser}, nil)
	if err != nil {
		t.Fatalf("add proxy user: %v", err)
	}
	kubeconfig, err := proxyUserCfg.KubeConfig()
	if err != nil {
		t.Fatalf("proxy kubeconfig: %v", err)
	}
	proxy := startProxy(t, ctx, filepath.Join(assets, "kube-rbac-proxy"), kubeconfig, upstream)

	for _, c := range []struct {
		name, token, path string
		want              int
	}{
		{"no token", "", allowedPath, http.StatusUnauthorized},
		{"garbage token", "not-a-token", allowedPath, http.StatusUnauthorized},
		{"token, RBAC allows", token, allowedPath, http.StatusOK},
		{"token, RBAC denies", token, deniedPath, http.StatusForbidden},
	} {
		resp := proxy.post(t, ctx, c.path, c.token)
		if resp.code != c.want {
			t.Errorf("%s: POST %s: got %d %q, want %d", c.name, c.path, resp.code, resp.body, c.want)
			continue
		}
		t.Logf("%s: POST %s: %d (HTTP/%d)", c.name, c.path, resp.code, resp.protoMajor)
		if c.want == http.StatusOK && resp.seenUser != saUser {
			t.Errorf("%s: upstream saw x-remote-user %q, want %q", c.name, resp.seenUser, saUser)
		}
	}
}

// assetsDir is KUBEBUILDER_ASSETS, or the repository's .cache/k8s/bin.
func assetsDir(t *testing.T) string {
	dir := os.Getenv("KUBEBUILDER_ASSETS")
	if dir == "" {
		var err error
		if dir, err = filepath.Abs(filepath.Join("..", "..", "..", ".cache", "k8s", "bin")); err != nil {
			t.Fatal(err)
		}
	}
	for _, name := range []string{"etcd", "kube-apiserver", "kube-rbac-proxy"} {
		if _, err := os.Stat(filepath.Join(dir, name)); err != nil {
			t.Fatalf("%v (build the binaries with `go run mage.go k8s:binaries` from the repository root)", err)
		}
	}
	return dir
}

func mustCreate(t *testing.T, create func() error) {
	t.Helper()
	if err := create(); err != nil {
		t.Fatalf("create: %v", err)
	}
}

func bind(t *testing.T, ctx context.Context, cs kubernetes.Interface, name, role string, subject rbacv1.Subject) {
	t.Helper()
	mustCreate(t, func() error {
		_, err := cs.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{
			ObjectMeta: metav1.ObjectMeta{Name: name},
			RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: role},
			Subjects:   []rbacv1.Subject{subject},
		}, metav1.CreateOptions{})
		return err
	})
}

func eventually(t *testing.T, ctx context.Context, what string, cond func() bool) {
	t.Helper()
	for !cond() {
		select {
		case <-ctx.Done():
			t.Fatalf("%s: %v", what, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// startUpstream serves HTTP/2 without TLS (h2c) on loopback TCP, like
// a gRPC server behind kube-rbac-proxy. It answers "ok" and echoes the user
// the proxy forwarded; anything but HTTP/2 is an error.
func startUpstream(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.ProtoMajor != 2 {
			http.Error(w, "want HTTP/2, got "+r.Proto, http.StatusHTTPVersionNotSupported)
			return
		}
		w.Header().Set("X-Seen-User", r.Header.Get("X-Remote-User"))
		io.WriteString(w, "ok")
	})
	// Prior-knowledge HTTP/2 only, as --upstream-force-h2c speaks it. (The
	// standard library's replacement for the deprecated x/net/http2/h2c.)
	srv := &http.Server{Handler: h, Protocols: new(http.Protocols), ReadHeaderTimeout: 10 * time.Second}
	srv.Protocols.SetUnencryptedHTTP2(true)
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return "http://" + ln.Addr().String() + "/"
}

type rbacProxy struct {
	url    string
	client *http.Client
}

type proxyResponse struct {
	code, protoMajor int
	body, seenUser   string
}

// startProxy runs kube-rbac-proxy and waits until it serves.
func startProxy(t *testing.T, ctx context.Context, bin string, kubeconfig []byte, upstream string) *rbacProxy {
	kubeconfigPath := filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(kubeconfigPath, kubeconfig, 0o600); err != nil {
		t.Fatal(err)
	}
	addr := "127.0.0.1:" + strconv.Itoa(freePort(t))
	var logs bytes.Buffer
	cmd := exec.Command(bin,
		"--secure-listen-address="+addr,
		"--upstream="+upstream,
		"--upstream-force-h2c",
		"--kubeconfig="+kubeconfigPath,
		"--auth-token-audiences="+audience,
		"--auth-header-fields-enabled",
	)
	cmd.Stdout, cmd.Stderr = &logs, &logs
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Signal(os.Interrupt)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
		if t.Failed() {
			t.Logf("kube-rbac-proxy output:\n%s", logs.String())
		}
	})

	p := &rbacProxy{
		url: "https://" + addr,
		client: &http.Client{
			Timeout: 10 * time.Second,
			Transport: &http.Transport{
				// Without --tls-cert-file the proxy serves a self-signed certificate.
				TLSClientConfig:   &tls.Config{InsecureSkipVerify: true},
				ForceAttemptHTTP2: true,
			},
		},
	}
	for {
		conn, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			conn.Close()
			break
		}
		select {
		case err := <-exited:
			exited <- err // for the cleanup
			t.Fatalf("kube-rbac-proxy exited: %v\n%s", err, logs.String())
		case <-ctx.Done():
			t.Fatalf("kube-rbac-proxy not listening on %s: %v", addr, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
	t.Logf("kube-rbac-proxy listening in %s", time.Since(start).Round(time.Millisecond))
	return p
}

func (p *rbacProxy) post(t *testing.T, ctx context.Context, path, token string) proxyResponse {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, p.url+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := p.client.Do(req)
	if err != nil {
		t.Fatalf("POST %s: %v", path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil && !errors.Is(err, io.EOF) {
		t.Fatalf("POST %s: read body: %v", path, err)
	}
	return proxyResponse{
		code: resp.StatusCode, protoMajor: resp.ProtoMajor,
		body: string(bytes.TrimSpace(body)), seenUser: resp.Header.Get("X-Seen-User"),
	}
}

func freePort(t *testing.T) int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}
