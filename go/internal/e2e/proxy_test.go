package e2e

import (
	"bytes"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"

	"github.com/guilhem/operator-plugin-framework/go/server"
)

// syncBuffer is a bytes.Buffer safe for a process's output.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// proxyArgs are the kube-rbac-proxy arguments of config/kube-rbac-proxy,
// with what only a pod has (listen address, upstream port, certificate
// paths) replaced, and a kubeconfig instead of the in-cluster
// configuration.
func proxyArgs(t testing.TB, listen, upstream, certFile, keyFile, kubeconfig string) []string {
	t.Helper()
	var d appsv1.Deployment
	render(t, "kube-rbac-proxy").get(t, "Deployment", "opf-operator", &d)
	replace := map[string]string{
		"--secure-listen-address": listen,
		"--upstream":              upstream,
		"--tls-cert-file":         certFile,
		"--tls-private-key-file":  keyFile,
	}
	var args []string
	for _, a := range container(t, &d, "kube-rbac-proxy").Args {
		name, _, _ := strings.Cut(a, "=")
		if v, ok := replace[name]; ok {
			a = name + "=" + v
			delete(replace, name)
		}
		args = append(args, a)
	}
	if len(replace) > 0 {
		t.Fatalf("config/kube-rbac-proxy lacks %v", replace)
	}
	return append(args, "--kubeconfig="+kubeconfig)
}

// proxyUID is the user the test runs kube-rbac-proxy as, and the server
// checks: the one config/kube-rbac-proxy runs it as, when the test can
// switch users (root); otherwise none.
func proxyUID(t testing.TB) int {
	if os.Getuid() != 0 {
		t.Logf("not root: kube-rbac-proxy runs as the test's user, and the server checks only its address")
		return server.AnyUID
	}
	var d appsv1.Deployment
	render(t, "kube-rbac-proxy").get(t, "Deployment", "opf-operator", &d)
	return int(runAsUser(t, &d, "kube-rbac-proxy"))
}

// readableDir is a folder the proxy's user can read, removed at the end.
func readableDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "e2e-proxy")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// startProxy runs kube-rbac-proxy with args, as uid unless it is
// server.AnyUID, until the test ends, and waits until it listens on addr.
// It returns the proxy's process id.
func startProxy(t testing.TB, bin, addr string, uid int, args []string) int {
	t.Helper()
	logs := &syncBuffer{}
	cmd := exec.Command(bin, args...)
	if uid != server.AnyUID {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(uid)}}
	}
	cmd.Stdout, cmd.Stderr = logs, logs
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(os.Interrupt)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
		if t.Failed() {
			t.Logf("kube-rbac-proxy output:\n%s", logs.String())
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		conn, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			conn.Close()
			break
		}
		select {
		case err := <-exited:
			exited <- err
			t.Fatalf("kube-rbac-proxy exited: %v\n%s", err, logs.String())
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("kube-rbac-proxy not listening on %s\n%s", addr, logs.String())
		}
	}
	t.Logf("kube-rbac-proxy listening in %s", time.Since(start).Round(time.Millisecond))
	return cmd.Process.Pid
}

func freeAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}
