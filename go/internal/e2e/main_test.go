package e2e

import (
	"os"
	"path/filepath"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		// client-go keeps idle keep-alive connections to the API server in
		// its shared transports, and klog flushes in the background.
		goleak.IgnoreTopFunction("net/http.(*persistConn).readLoop"),
		goleak.IgnoreTopFunction("net/http.(*persistConn).writeLoop"),
		goleak.IgnoreTopFunction("golang.org/x/net/http2.(*ClientConn).readLoop"),
		goleak.IgnoreTopFunction("k8s.io/klog/v2.(*flushDaemon).run.func1"),
		goleak.IgnoreAnyFunction("k8s.io/client-go/util/workqueue.(*Typed[...]).updateUnfinishedWorkLoop"),
	)
}

// assets returns the folder of the Kubernetes binaries and the path of
// kube-rbac-proxy, or skips the test when KUBEBUILDER_ASSETS is not set.
func assets(t testing.TB) (dir, rbacProxy string) {
	t.Helper()
	dir = os.Getenv("KUBEBUILDER_ASSETS")
	if dir == "" {
		t.Skip("KUBEBUILDER_ASSETS is not set: run `go run mage.go e2e` from the repository root")
	}
	rbacProxy = os.Getenv("KUBE_RBAC_PROXY")
	if rbacProxy == "" {
		rbacProxy = filepath.Join(dir, "kube-rbac-proxy")
	}
	for _, p := range []string{filepath.Join(dir, "etcd"), filepath.Join(dir, "kube-apiserver"), rbacProxy} {
		if _, err := os.Stat(p); err != nil {
			t.Fatalf("%v (build the binaries with `go run mage.go k8s:binaries`)", err)
		}
	}
	return dir, rbacProxy
}
