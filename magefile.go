//go:build mage

// Build targets. Run them with `go run mage.go <target>`; `go run mage.go -l`
// lists them.
package main

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/magefile/mage/mg"
	"github.com/magefile/mage/sh"
)

// binDir holds the pinned build tools (git-ignored).
const binDir = ".bin"

// goTool describes a pinned tool built from one of the tool modules.
type goTool struct {
	name    string
	modfile string
	pkg     string
}

var goTools = []goTool{
	{"buf", "tools/buf/go.mod", "github.com/bufbuild/buf/cmd/buf"},
	{"protoc-gen-go", "tools/go.mod", "google.golang.org/protobuf/cmd/protoc-gen-go"},
	{"protoc-gen-go-grpc", "tools/go.mod", "google.golang.org/grpc/cmd/protoc-gen-go-grpc"},
	{"staticcheck", "tools/go.mod", "honnef.co/go/tools/cmd/staticcheck"},
}

// Tools builds the pinned build tools into .bin/ (go build's cache makes a
// second run cheap).
func Tools() error {
	for _, t := range goTools {
		if err := goBuild(t.modfile, filepath.Join(binDir, t.name), t.pkg); err != nil {
			return err
		}
	}
	return nil
}

// goBuild builds pkg from the module described by modfile, outside the
// workspace so that tool dependencies never mix with the framework's.
func goBuild(modfile, out, pkg string) error {
	env := map[string]string{"GOWORK": "off"}
	return sh.RunWithV(env, "go", "build", "-modfile="+modfile, "-o", out, pkg)
}

func tool(name string) string { return filepath.Join(binDir, name) }

// Generate regenerates the code generated from proto/ (into go/gen) and
// from examples/proto (into examples/gen), and the Python SDK's (into
// sdk/python).
func Generate() error {
	mg.Deps(Tools)
	if err := sh.RunV(tool("buf"), "generate"); err != nil {
		return err
	}
	if err := sh.RunV(tool("buf"), "generate", "--template", "examples/buf.gen.yaml"); err != nil {
		return err
	}
	if pythonPresent() {
		if err := (Python{}).Generate(); err != nil { // magefile_python.go
			return err
		}
	}
	if rustPresent() {
		return RustGenerate() // magefile_rust.go
	}
	return nil
}

// Breaking checks proto/ for changes that break wire compatibility with a
// git ref: $BUF_BREAKING_AGAINST, by default the main branch.
func Breaking() error {
	mg.Deps(Tools)
	against := os.Getenv("BUF_BREAKING_AGAINST")
	if against == "" {
		against = ".git#branch=main"
	}
	return sh.RunV(tool("buf"), "breaking", "--against", against)
}

// Lint checks formatting, vet, staticcheck, buf lint, and that generated
// code matches proto/; for the Python SDK, ruff, mypy and its generated code.
func Lint() error {
	mg.Deps(Tools)
	out, err := sh.Output("gofmt", append([]string{"-l", "magefile.go"}, goModules()...)...)
	if err != nil {
		return err
	}
	if out != "" {
		return fmt.Errorf("gofmt would change:\n%s", out)
	}
	for _, dir := range goModules() {
		if err := runIn(dir, nil, "go", "vet", "./..."); err != nil {
			return err
		}
		if err := runIn(dir, nil, absTool("staticcheck"), "./..."); err != nil {
			return err
		}
	}
	if err := sh.RunV(tool("buf"), "lint"); err != nil {
		return err
	}
	if err := checkGenerated(); err != nil {
		return err
	}
	if pythonPresent() {
		if err := (Python{}).Lint(); err != nil { // magefile_python.go
			return err
		}
	}
	if rustPresent() {
		return RustLint() // magefile_rust.go
	}
	return nil
}

// checkGenerated regenerates into a scratch copy and fails when the
// committed generated code differs.
func checkGenerated() error {
	if err := sh.RunV(tool("buf"), "generate"); err != nil {
		return err
	}
	if err := sh.RunV(tool("buf"), "generate", "--template", "examples/buf.gen.yaml"); err != nil {
		return err
	}
	out, err := sh.Output("git", "status", "--porcelain", "--", "go/gen", "examples/gen")
	if err != nil {
		return err
	}
	if out != "" {
		return fmt.Errorf("generated code is stale; commit the output of `go run mage.go generate`:\n%s", out)
	}
	return nil
}

// goModules lists the workspace's Go modules that hold code to check.
func goModules() []string {
	var dirs []string
	for _, d := range []string{"go", "examples", "conformance"} {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			dirs = append(dirs, d)
		}
	}
	return dirs
}

// Test runs lint and every test suite: the Go tests with the race detector
// and goroutine-leak checks, the Python SDK's pytest suite, the conformance
// suite against every SDK, and the end-to-end tests against real Kubernetes
// components.
func Test(ctx context.Context) error {
	mg.SerialCtxDeps(ctx, Lint)
	for _, dir := range goModules() {
		if err := runIn(dir, nil, "go", "test", "-race", "-count=1", "-timeout=10m", "./..."); err != nil {
			return err
		}
	}
	if pythonPresent() {
		if err := pythonTests(); err != nil { // magefile_python.go; Lint ran above
			return err
		}
	}
	if rustPresent() {
		if err := RustTest(); err != nil { // magefile_rust.go; Lint ran above
			return err
		}
	}
	if err := Conformance(ctx); err != nil {
		return err
	}
	return E2E(ctx)
}

// Stress runs the byte-checking stress test (TestStress: all four RPC
// kinds, random sizes and content, up to 200 callers, every byte checked,
// direct gRPC as the control) under the race detector for
// $STRESS_DURATION (default 2m), and the interop cases many times.
func Stress() error {
	d := os.Getenv("STRESS_DURATION")
	if d == "" {
		d = "2m"
	}
	return runIn("go", nil, "go", "test", "-race", "-count=1", "-timeout=60m", "-v",
		"-run", "^(TestStress|TestInteropConcurrent)$", "./internal/integration/", "-args", "-stress.duration="+d)
}

// Scale measures one operator with many plugins (internal/scale): what an
// idle registered tunnel costs the operator (heap and goroutines, with
// 1,000 plugins), and how fast 10,000 plugins register again after the
// operator restarts, with the curve of registrations every 100 ms. The
// plugins run in child processes. $OPF_SCALE_PLUGINS, $OPF_SCALE_PROCS,
// $OPF_SCALE_GAP_MS and $OPF_SCALE_UNREGISTERED (total,perPeer) change
// the restart test's set-up (go/internal/scale/restart_test.go).
func Scale() error {
	return runIn("go", map[string]string{"OPF_SCALE": "1"}, "go", "test", "-count=1", "-timeout=20m", "-v",
		"-run", "^(TestIdleTunnelCost|TestRestartReconnect)$", "./internal/scale/")
}

// Bench compares calls through the tunnel with a control over the same
// path, on this machine, in the same run, and prints the ratios and the
// targets (go/internal/bench/report). Three deployments: plaintext on a
// unix socket (go/internal/bench), and, against a real kube-apiserver,
// built-in TLS + ServiceAccount token on loopback TCP and the server behind
// the real kube-rbac-proxy (go/internal/e2e BenchmarkDeployments). It
// builds the Kubernetes binaries first, as `e2e` does (K8s.Binaries:
// minutes the first time, nothing afterwards); if they cannot be built,
// the two Kubernetes modes are reported as not run.
//
// Each round runs every benchmark once per path, after a warm-up; the
// rounds rotate the order of the paths and of the packages, so that drift
// in the machine's load hits tunnel and control alike. The report takes
// medians over the rounds.
func Bench(ctx context.Context) error {
	const (
		rounds    = 5
		benchtime = "1s"
	)
	out := filepath.Join(os.TempDir(), "opf-bench.txt")
	f, err := os.Create(out)
	if err != nil {
		return err
	}
	defer f.Close()

	fmt.Println("bench: building the Kubernetes binaries (etcd, kube-apiserver, kube-rbac-proxy) as `e2e` does, unless up to date")
	var skipped string
	if err := (K8s{}).Binaries(ctx); err != nil {
		skipped = "tls,proxy=the Kubernetes binaries could not be built: " + err.Error()
		fmt.Printf("bench: %v\nbench: only the plaintext mode runs\n", err)
	}
	type pkg struct {
		name string
		dir  string // of the Go module; go/ when empty
		args []string
		env  []string
		// last, when set, gives the arguments after -args for a round.
		last func(round int) []string
	}
	pkgs := []pkg{{name: "plaintext", args: []string{"-bench=^BenchmarkPlaintext$", "./internal/bench/"}}}
	if skipped == "" {
		pkgs = append(pkgs, pkg{
			name: "tls and kube-rbac-proxy",
			args: []string{"-bench=^BenchmarkDeployments$", "-timeout=10m", "./internal/e2e/"},
			env:  []string{"KUBEBUILDER_ASSETS=" + k8sAssetsDir(), "KUBE_RBAC_PROXY=" + k8sRBACProxyPath()},
		})
	}
	// The other SDKs' plugins against their own language's gRPC server
	// (conformance/sdkbench), built first (magefile_conformance.go).
	sdks, err := pluginCommands("-sdk", func(name string) bool { return name != "go" })
	if err != nil {
		return err
	}
	for _, sdk := range []string{"python", "rust"} {
		if !slices.ContainsFunc(sdks, func(a string) bool { return strings.HasPrefix(a, sdk+"=") }) {
			skipped += ";" + sdk + "=sdk/" + sdk + " is not in the tree"
		}
	}
	if len(sdks) > 0 {
		pkgs = append(pkgs, pkg{
			name: "python and rust plugins",
			dir:  "conformance",
			args: []string{"-bench=^BenchmarkSDK", "./sdkbench/"},
			last: func(round int) []string {
				if round%2 == 1 {
					return append([]string{"-tunnel-first"}, sdks...)
				}
				return sdks
			},
		})
	}
	fmt.Printf("bench: %d rounds (about 6 minutes), raw results in %s\n", rounds, out)
	start := time.Now()
	for round := range rounds {
		for i := range pkgs {
			p := pkgs[(round+i)%len(pkgs)]
			fmt.Printf("bench: round %d/%d: %s\n", round+1, rounds, p.name)
			args := append([]string{"test", "-run=^$", "-benchtime=" + benchtime, "-count=1"}, p.args...)
			if p.last != nil {
				args = append(append(args, "-args"), p.last(round)...)
			}
			cmd := exec.CommandContext(ctx, mg.GoCmd(), args...)
			cmd.Dir = cmp.Or(p.dir, "go")
			cmd.Env = append(append(os.Environ(), fmt.Sprintf("OPF_BENCH_ROUND=%d", round)), p.env...)
			cmd.Stdout = f
			cmd.Stderr = os.Stderr
			if err := cmd.Run(); err != nil {
				return fmt.Errorf("bench: %s: %w (output in %s)", p.name, err, out)
			}
		}
	}
	fmt.Printf("bench: %s\n", time.Since(start).Round(time.Second))
	report := exec.Command(mg.GoCmd(), "run", "./internal/bench/report", "-skipped="+skipped, out)
	report.Dir = "go"
	report.Stdout = os.Stdout
	report.Stderr = os.Stderr
	return report.Run()
}

// Demo runs an operator and plugins on a local socket, one per SDK in the
// tree (Go, and Python and Rust when sdk/python and sdk/rust exist), and
// has the operator call each with every kind of RPC. The first run creates
// the Python environment and builds the Rust plugin (minutes, said so).
func Demo() error {
	args := []string{"run", "./demo"}
	for _, sdk := range demoSDKs() {
		if !sdk.present() {
			continue
		}
		argv, err := sdk.command()
		if err != nil {
			return fmt.Errorf("the %s demo plugin: %w", sdk.name, err)
		}
		enc, err := json.Marshal(argv)
		if err != nil {
			return err
		}
		args = append(args, "-plugin", sdk.name+"="+string(enc))
	}
	return runIn("examples", nil, "go", args...)
}

// demoSDK is another SDK's demo plugin: when it is in the tree, and the
// command that runs it (building it first if needed).
type demoSDK struct {
	name    string
	present func() bool
	command func() ([]string, error)
}

func demoSDKs() []demoSDK {
	return []demoSDK{
		{"validator-python", pythonPresent, pythonDemoPlugin},
		{"validator-rust", rustPresent, rustDemoPlugin}, // magefile_rust.go
	}
}

func absTool(name string) string {
	p, _ := filepath.Abs(tool(name))
	return p
}

// runIn runs a command in dir with its output shown.
func runIn(dir string, env map[string]string, cmd string, args ...string) error {
	fmt.Printf("[%s] %s %s\n", dir, cmd, strings.Join(args, " "))
	c := exec.Command(cmd, args...)
	c.Dir = dir
	c.Stdout, c.Stderr = os.Stdout, os.Stderr
	c.Env = os.Environ()
	for k, v := range env {
		c.Env = append(c.Env, k+"="+v)
	}
	return c.Run()
}
