//go:build mage

// Real Kubernetes test binaries (etcd, kube-apiserver, kube-rbac-proxy),
// built from Go modules because nothing can be downloaded from GitHub or
// cloud buckets (so `setup-envtest use` is not an option).
//
// Each binary comes from a small wrapper module under hack/k8s/<name>/ that
// is not part of go.work: it is built with GOWORK=off, and its go.mod pins
// exact versions. The binaries land in .cache/k8s/bin/ (git-ignored) next to
// a <name>.stamp file holding a hash of everything that went into the build;
// a binary whose stamp matches is not rebuilt.
//
// Other targets use them like this:
//
//	mg.CtxDeps(ctx, K8s.Binaries)
//	env := map[string]string{"KUBEBUILDER_ASSETS": k8sAssetsDir()} // envtest
//	proxy := k8sRBACProxyPath()

package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"github.com/magefile/mage/mg"
	"github.com/magefile/mage/sh"
)

// K8s builds and checks the real Kubernetes binaries used by the end-to-end tests.
type K8s mg.Namespace

const (
	// k8sVersion is the Kubernetes release of kube-apiserver (hack/k8s/kube-apiserver/go.mod).
	k8sVersion = "v1.34.4"
	// k8sEtcdVersion is the etcd release (hack/k8s/etcd/go.mod).
	k8sEtcdVersion = "v3.6.16"
	// k8sRBACProxyVersion is the kube-rbac-proxy release (hack/k8s/kube-rbac-proxy/go.mod).
	k8sRBACProxyVersion = "v0.19.1"

	// k8sStampFormat changes whenever the way the binaries are built changes
	// in a way the hashed inputs do not show.
	k8sStampFormat = "k8s-binaries/1"
)

// k8sBinary is one binary and the wrapper module it is built from.
type k8sBinary struct {
	name    string // file name in the bin folder (what envtest looks for)
	module  string // wrapper module, relative to the repository root
	version string // for messages only: the real pin is in the module's go.mod
	ldflags string
}

// k8sBinaryList is built in this order, one at a time: kube-apiserver alone
// takes ~3 minutes and ~5 GB of build cache, and the machines have 2 cores.
var k8sBinaryList = []k8sBinary{
	{name: "etcd", module: "hack/k8s/etcd", version: k8sEtcdVersion, ldflags: "-s -w"},
	{
		name: "kube-apiserver", module: "hack/k8s/kube-apiserver", version: k8sVersion,
		// What `kube-apiserver --version` and /version report; envtest does
		// not need it, but a v0.0.0-master version confuses clients.
		ldflags: k8sVersionLDFlags(k8sVersion),
	},
	{name: "kube-rbac-proxy", module: "hack/k8s/kube-rbac-proxy", version: k8sRBACProxyVersion, ldflags: "-s -w"},
}

// Binaries builds etcd, kube-apiserver and kube-rbac-proxy into .cache/k8s/bin/,
// skipping each one that is already there and built from the same inputs.
func (K8s) Binaries(ctx context.Context) error {
	dir := k8sAssetsDir()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	start := time.Now()
	built := 0
	for _, b := range k8sBinaryList {
		if err := ctx.Err(); err != nil {
			return err
		}
		did, err := k8sBuild(b, dir)
		if err != nil {
			return fmt.Errorf("k8s: %s: %w", b.name, err)
		}
		if did {
			built++
		}
	}
	if built > 0 {
		fmt.Printf("k8s: %d of %d binaries built in %s, in %s\n",
			built, len(k8sBinaryList), time.Since(start).Round(time.Second), dir)
	}
	return nil
}

// Smoke builds the binaries, then runs hack/k8s/smoke: envtest with
// TokenRequest, TokenReview and SubjectAccessReview, and kube-rbac-proxy in
// front of an h2c server.
func (K8s) Smoke(ctx context.Context) error {
	mg.CtxDeps(ctx, K8s.Binaries)
	args := []string{"test", "-C", k8sRepoPath("hack/k8s/smoke"), "-count=1"}
	if mg.Verbose() {
		args = append(args, "-v")
	}
	return sh.RunWithV(map[string]string{
		"GOWORK":             "off",
		"KUBEBUILDER_ASSETS": k8sAssetsDir(),
	}, mg.GoCmd(), append(args, "./...")...)
}

// k8sAssetsDir is the absolute path of the folder holding etcd and
// kube-apiserver: what envtest wants in KUBEBUILDER_ASSETS.
func k8sAssetsDir() string {
	return k8sRepoPath(".cache", "k8s", "bin")
}

// k8sRBACProxyPath is the absolute path of the kube-rbac-proxy binary.
func k8sRBACProxyPath() string {
	return filepath.Join(k8sAssetsDir(), "kube-rbac-proxy")
}

// k8sRepoPath turns a path relative to the repository root into an absolute
// one. Mage runs targets in the folder holding the magefiles, which is the
// repository root.
func k8sRepoPath(elem ...string) string {
	p := filepath.Join(elem...)
	if abs, err := filepath.Abs(p); err == nil {
		return abs
	}
	return p
}

func k8sVersionLDFlags(version string) string {
	major, minor, _ := strings.Cut(strings.TrimPrefix(version, "v"), ".")
	minor, _, _ = strings.Cut(minor, ".")
	const pkg = "k8s.io/component-base/version"
	return strings.Join([]string{
		"-s", "-w",
		"-X", pkg + ".gitVersion=" + version,
		"-X", pkg + ".gitMajor=" + major,
		"-X", pkg + ".gitMinor=" + minor,
		"-X", pkg + ".gitTreeState=clean",
	}, " ")
}

// k8sBuild builds one binary into dir unless its stamp shows it is up to
// date. It reports whether it built.
func k8sBuild(b k8sBinary, dir string) (bool, error) {
	out := filepath.Join(dir, b.name)
	stampPath := out + ".stamp"
	env := map[string]string{"GOWORK": "off", "CGO_ENABLED": "0"}
	flags := []string{"-trimpath", "-buildvcs=false", "-ldflags=" + b.ldflags}
	args := append([]string{"build", "-C", k8sRepoPath(b.module)}, flags...)
	args = append(args, "-o", out+".tmp", ".")

	stamp, err := k8sStamp(b, env, flags)
	if err != nil {
		return false, err
	}
	if old, err := os.ReadFile(stampPath); err == nil && string(old) == stamp {
		if fi, err := os.Stat(out); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			if mg.Verbose() {
				fmt.Printf("k8s: %s %s is up to date\n", b.name, b.version)
			}
			return false, nil
		}
	}

	fmt.Printf("k8s: building %s %s from %s ...\n", b.name, b.version, b.module)
	start := time.Now()
	// No stamp while the binary is being replaced: an interrupted build
	// must not leave a binary that looks up to date.
	if err := os.Remove(stampPath); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return false, err
	}
	if err := sh.RunWith(env, mg.GoCmd(), args...); err != nil {
		_ = os.Remove(out + ".tmp")
		return false, err
	}
	if err := os.Rename(out+".tmp", out); err != nil {
		return false, err
	}
	if err := os.WriteFile(stampPath, []byte(stamp), 0o644); err != nil {
		return false, err
	}
	size := ""
	if fi, err := os.Stat(out); err == nil {
		size = fmt.Sprintf(", %d MB", fi.Size()>>20)
	}
	fmt.Printf("k8s: built %s in %s%s\n", b.name, time.Since(start).Round(time.Second), size)
	return true, nil
}

// k8sStamp hashes what decides the content of a binary: the wrapper
// module's go.mod, go.sum and main.go, the build flags and environment, and
// the target platform. The Go toolchain version is left out on purpose: a Go
// patch release alone should not cost a 3-minute rebuild.
//
// Paths are left out too: moving the checkout must not rebuild.
func k8sStamp(b k8sBinary, env map[string]string, flags []string) (string, error) {
	h := sha256.New()
	fmt.Fprintf(h, "%s\n%s/%s\nGOWORK=%s CGO_ENABLED=%s\n%q\n",
		k8sStampFormat, runtime.GOOS, runtime.GOARCH, env["GOWORK"], env["CGO_ENABLED"], flags)
	for _, f := range []string{"go.mod", "go.sum", "main.go"} {
		data, err := os.ReadFile(filepath.Join(k8sRepoPath(b.module), f))
		if err != nil {
			return "", err
		}
		fmt.Fprintf(h, "%s %d\n", f, len(data))
		h.Write(data)
	}
	return hex.EncodeToString(h.Sum(nil)) + "\n", nil
}
