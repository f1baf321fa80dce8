// Package e2e proves the security path against real Kubernetes components:
// etcd and kube-apiserver started by controller-runtime's envtest, and
// kube-rbac-proxy, all built from Go modules by `go run mage.go
// k8s:binaries`. The tests run the operator's server in both modes (built
// in, and behind kube-rbac-proxy) with real plugins, ServiceAccounts,
// RBAC rules taken from config/, and tokens from the TokenRequest API.
//
// Run them with `go run mage.go e2e`. Without KUBEBUILDER_ASSETS, `go test`
// skips them; the manifest test (TestManifests) needs no cluster and
// always runs.
package e2e
