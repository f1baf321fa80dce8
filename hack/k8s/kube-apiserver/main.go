// Command kube-apiserver is Kubernetes v1.34.4's API server built from Go
// modules, for envtest.
//
// `go install k8s.io/kubernetes/cmd/kube-apiserver@...` refuses to build
// because k8s.io/kubernetes requires its staging modules at v0.0.0 and
// replaces them with local paths; this wrapper module replaces each of them
// with its published v0.34.4 instead. Build it with GOWORK=off and set the
// version through -ldflags (see magefile_k8s.go).
package main

import (
	"os"

	"k8s.io/component-base/cli"
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
)

func main() {
	os.Exit(cli.Run(app.NewAPIServerCommand()))
}
