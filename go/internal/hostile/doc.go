// Package hostile replays, against the real operator server, the attacks a
// hostile or broken peer can make (issue 11), and checks that each one
// meets a bound.
//
// Every test starts the server in a child process of its own (this test
// binary, run again as the child), so that what is measured is the
// server's: its peak resident memory (VmHWM, from /proc), its goroutines
// (sampled while the attack runs) and, for the attacks on authentication,
// the TokenReviews it sends to a real API server (envtest; those tests are
// skipped without KUBEBUILDER_ASSETS, `go run mage.go e2e` runs them).
// After each attack a real plugin registers and serves a call through the
// server: the operator is still up and still serves plugins.
//
// Everything stays on loopback. Each attack is bounded in time and count;
// set HOSTILE_RESULTS to a file to collect the measurements as JSON lines.
package hostile
