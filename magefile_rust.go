//go:build mage

// The Rust SDK (sdk/rust, docs in sdk/rust/README.md): lint, tests, the
// conformance plugin and the demo plugin, all built by cargo into one
// target directory under .cache/ (git-ignored, cached by CI) with one
// profile (release) and one feature set (always the whole workspace), so
// that dependencies compile once and every later build reuses them.

package main

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/magefile/mage/mg"
)

// rustDir is the Cargo workspace of the Rust SDK.
const rustDir = "sdk/rust"

func rustPresent() bool {
	_, err := os.Stat(filepath.Join(rustDir, "Cargo.toml"))
	return err == nil
}

// rustTargetDir is cargo's target directory, reused between runs.
func rustTargetDir() string { return absPath(".cache", "rust-target") }

// rustBin is the path of a binary of the workspace.
func rustBin(name string) string { return filepath.Join(rustTargetDir(), "release", name) }

// cargo runs cargo in the workspace with the shared target directory and
// at most two jobs (the machines have two cores).
func cargo(env map[string]string, args ...string) error {
	all := map[string]string{"CARGO_TARGET_DIR": rustTargetDir(), "CARGO_BUILD_JOBS": "2"}
	for k, v := range env {
		all[k] = v
	}
	return runIn(rustDir, all, "cargo", args...)
}

// rustBuild builds every crate of the workspace: the SDK, the conformance
// plugin, the demo plugin and the code generator. Building the whole
// workspace every time keeps one feature set, so nothing is rebuilt.
func rustBuild() error {
	return cargo(nil, "build", "--release", "--workspace")
}

// RustGenerate regenerates the Rust code generated from proto/ (protox and
// tonic-prost-build, no protoc): what RustLint's freshness test compares.
// It runs the codegen binary of the whole-workspace build, so that no
// other feature set is compiled.
func RustGenerate() error {
	if err := rustBuild(); err != nil {
		return err
	}
	return runIn(rustDir, nil, rustBin("codegen"))
}

// RustBuild builds the Rust workspace (release profile, into .cache/).
func RustBuild() error {
	return rustBuild()
}

// RustLint checks the Rust SDK: rustfmt, clippy with warnings as errors on
// every target, rustdoc warnings, and that the code generated from proto/
// matches what `cargo run -p codegen` writes.
func RustLint() error {
	if err := cargo(nil, "fmt", "--all", "--check"); err != nil {
		return err
	}
	if err := cargo(nil, "clippy", "--release", "--workspace", "--all-targets", "--", "-D", "warnings"); err != nil {
		return err
	}
	if err := cargo(map[string]string{"RUSTDOCFLAGS": "-D warnings"}, "doc", "--release", "--workspace", "--no-deps"); err != nil {
		return err
	}
	return cargo(nil, "test", "--release", "--workspace", "--test", "fresh")
}

// RustTest runs every Rust test: unit tests, doctests, and the integration
// and stress tests against the real Go server (conformance/cmd/testoperator,
// built here and handed over in OPF_TESTOPERATOR).
func RustTest() error {
	if err := os.MkdirAll(binDir, 0o755); err != nil {
		return err
	}
	op := absPath(binDir, "testoperator")
	if err := runIn(".", nil, "go", "build", "-o", op, "./conformance/cmd/testoperator"); err != nil {
		return err
	}
	return cargo(map[string]string{"OPF_TESTOPERATOR": op}, "test", "--release", "--workspace")
}

// Rust runs the Rust SDK's lint and tests (what `test` and `lint` run for
// it).
func Rust() {
	mg.SerialDeps(RustLint, RustTest)
}

// rustConformancePlugin builds the conformance plugin and returns its path.
func rustConformancePlugin() (string, error) {
	if err := rustBuild(); err != nil {
		return "", err
	}
	return rustBin("conformance-plugin"), nil
}

// rustDemoPlugin builds the Rust demo plugin (sdk/rust/examples/validator,
// serving demo.v1.ValidatorService) and returns its command line. The
// process reads the operator's address from $OPF_DEMO_TARGET, and stops on
// SIGTERM, SIGINT or the end of its standard input.
func rustDemoPlugin() ([]string, error) {
	fmt.Println("building the Rust demo plugin (cargo; a cold build takes several minutes, later ones seconds)")
	if err := rustBuild(); err != nil {
		return nil, fmt.Errorf("building the Rust demo plugin: %w", err)
	}
	return []string{rustBin("validator-plugin")}, nil
}
