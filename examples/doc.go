// Package examples holds the Operator Plugin Framework's examples; the code
// is in its subdirectories and the runnable examples in its tests.
//
//   - validator: the demo.v1.ValidatorService implementation a plugin serves
//     (gen/demo/v1 holds the generated code, proto/ its definition).
//   - plugin: a plugin program.
//   - operator: an operator program, with a controller-runtime manager and
//     a reconciler that calls the plugin named in a ConfigMap's annotation
//     (in a cluster, or with -envtest against a local API server), and its
//     tests: with the test kit (go/plugintest), a fake, and envtest.
//   - demo: both sides on one machine, without a cluster
//     (`go run mage.go demo` from the repository root).
package examples
