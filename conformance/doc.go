// Package conformance is the conformance suite of the Operator Plugin
// Framework: cases written as data (cases/*.yaml) and the runner that plays
// them against a plugin program of any SDK, with the framework's Go server
// as the operator, and at the frame level as a raw peer on either side of
// the tunnel. cmd/conformance is its command line; docs/conformance.md
// describes the case format, the plugin program's contract and the
// known-failing lists.
package conformance
