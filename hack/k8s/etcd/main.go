// Command etcd is etcd v3.6.16 built from Go modules, for envtest.
//
// `go install go.etcd.io/etcd/...` refuses to build because etcd's own go.mod
// uses replace directives; this wrapper module requires the server module and
// calls its entry point. Build it with GOWORK=off (see magefile_k8s.go).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
