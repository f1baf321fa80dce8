// Command kube-rbac-proxy is brancz/kube-rbac-proxy v0.19.1 built from Go
// modules, to put Kubernetes authentication and authorization in front of a
// gRPC server in end-to-end tests.
//
// The module proxy serves v0.19.1 (later versions are refused), and its
// dependency gopkg.in/square/go-jose.v2 is only reachable under its new name,
// hence this wrapper module and its replace. Build it with GOWORK=off (see
// magefile_k8s.go).
package main

import (
	"os"

	"github.com/brancz/kube-rbac-proxy/cmd/kube-rbac-proxy/app"
	"k8s.io/component-base/cli"
)

func main() {
	os.Exit(cli.Run(app.NewKubeRBACProxyCommand()))
}
