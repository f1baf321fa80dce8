//go:build mage

// The Python plugin SDK (sdk/python): its virtual environment, generated
// code, lint and tests.
//
// Everything runs in one virtual environment under .cache/python/
// (git-ignored), created from sdk/python/requirements-dev.txt, which pins
// every package exactly. The environment's folder is named after a hash of
// that file and of the Python version, so a changed pin makes a new one and
// an unchanged pin reuses it. The host needs only python3 (3.10 or later)
// with its venv module; the packages come from PyPI through pip.
//
// Other targets use it like this:
//
//	py, err := pythonVenv() // the environment's interpreter
//	cmd, err := pythonDemoPlugin()

package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/magefile/mage/mg"
)

// Python builds, checks and tests the Python plugin SDK.
type Python mg.Namespace

const (
	pythonSDKDir       = "sdk/python"
	pythonRequirements = "sdk/python/requirements-dev.txt"
	pythonCacheDir     = ".cache/python"
	// pythonVenvFormat changes whenever the way the environment is made
	// changes in a way the hashed inputs do not show.
	pythonVenvFormat = "python-venv/1"
)

// pythonPresent reports whether the tree has the Python SDK.
func pythonPresent() bool {
	_, err := os.Stat(pythonSDKDir)
	return err == nil
}

// hostPython is the interpreter the environment is made from: $PYTHON, or
// python3.
func hostPython() (string, error) {
	py := os.Getenv("PYTHON")
	if py == "" {
		py = "python3"
	}
	path, err := exec.LookPath(py)
	if err != nil {
		return "", fmt.Errorf("the Python SDK needs python3 (3.10 or later) on PATH, or $PYTHON: %w", err)
	}
	return path, nil
}

// pythonVenv makes the virtual environment if it is missing or stale and
// returns the path of its interpreter. Concurrent callers wait for each
// other (a lock file), so that two targets never build it at once.
func pythonVenv() (string, error) {
	host, err := hostPython()
	if err != nil {
		return "", err
	}
	version, err := exec.Command(host, "-c", "import sys; print(sys.version); raise SystemExit(sys.version_info < (3, 10))").Output()
	if err != nil {
		return "", fmt.Errorf("%s: Python 3.10 or later is needed (found %s)", host, strings.TrimSpace(string(version)))
	}
	reqs, err := os.ReadFile(pythonRequirements)
	if err != nil {
		return "", err
	}
	h := sha256.New()
	fmt.Fprintf(h, "%s\n%s\n%s\n", pythonVenvFormat, host, version)
	h.Write(reqs)
	key := hex.EncodeToString(h.Sum(nil))[:16]
	cache := absPath(pythonCacheDir)
	dir := filepath.Join(cache, "venv-"+key)
	py := filepath.Join(dir, "bin", "python")
	stamp := filepath.Join(dir, ".complete")
	if _, err := os.Stat(stamp); err == nil {
		return py, nil
	}
	if err := os.MkdirAll(cache, 0o755); err != nil {
		return "", err
	}
	lock, err := os.OpenFile(filepath.Join(cache, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return "", err
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return "", err
	}
	defer syscall.Flock(int(lock.Fd()), syscall.LOCK_UN) //nolint:errcheck // closing unlocks too
	if _, err := os.Stat(stamp); err == nil {
		return py, nil // made while we waited
	}
	start := time.Now()
	fmt.Printf("[python] creating the virtual environment %s\n", dir)
	_ = os.RemoveAll(dir)
	if err := runIn(".", nil, host, "-m", "venv", dir); err != nil {
		return "", fmt.Errorf("python3 -m venv (on Debian: apt-get install python3-venv): %w", err)
	}
	if err := runIn(".", nil, py, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
		"--quiet", "--only-binary=:all:", "-r", pythonRequirements); err != nil {
		return "", err
	}
	if err := os.WriteFile(stamp, []byte(time.Now().UTC().Format(time.RFC3339)+"\n"), 0o644); err != nil {
		return "", err
	}
	fmt.Printf("[python] virtual environment ready in %s\n", time.Since(start).Round(time.Second))
	// Environments of older pins are not needed any more.
	old, _ := filepath.Glob(filepath.Join(cache, "venv-*"))
	for _, o := range old {
		if o != dir {
			_ = os.RemoveAll(o)
		}
	}
	return py, nil
}

// Venv creates the Python SDK's virtual environment (.cache/python/),
// unless it is up to date, and prints its interpreter's path.
func (Python) Venv() error {
	py, err := pythonVenv()
	if err != nil {
		return err
	}
	fmt.Println(py)
	return nil
}

// Generate regenerates the Python code for proto/ and the demo's proto
// with the pinned grpcio-tools (no system protoc).
func (Python) Generate() error {
	py, err := pythonVenv()
	if err != nil {
		return err
	}
	return runIn(pythonSDKDir, nil, py, "tools/generate.py")
}

// Lint runs ruff (check and format), mypy --strict, checks that the
// generated code matches the protos, and that the wheel builds with its
// typing marker and generated code.
func (Python) Lint() error {
	py, err := pythonVenv()
	if err != nil {
		return err
	}
	steps := [][]string{
		{py, "-m", "ruff", "check", "."},
		{py, "-m", "ruff", "format", "--check", "."},
		{py, "-m", "mypy"},
		{py, "tools/generate.py", "--check"},
		{py, "tools/check_package.py"},
	}
	for _, s := range steps {
		if err := runIn(pythonSDKDir, nil, s[0], s[1:]...); err != nil {
			return fmt.Errorf("python lint: %s: %w", strings.Join(s[1:], " "), err)
		}
	}
	return nil
}

// Test lints the Python SDK and runs its pytest suite against the
// framework's Go server (conformance/cmd/testoperator, built first).
// PYTEST_FLAGS adds pytest flags, for example PYTEST_FLAGS='-k stress -v'.
func (Python) Test(ctx context.Context) error {
	mg.SerialCtxDeps(ctx, Python.Lint)
	return pythonTests()
}

// pythonTests runs pytest (without the lint).
func pythonTests() error {
	py, err := pythonVenv()
	if err != nil {
		return err
	}
	// $OPF_TESTOPERATOR names a testoperator built already.
	operator := os.Getenv("OPF_TESTOPERATOR")
	if operator == "" {
		if err := os.MkdirAll(binDir, 0o755); err != nil {
			return err
		}
		operator = absPath(binDir, "testoperator")
		if err := runIn("conformance", nil, "go", "build", "-o", operator, "./cmd/testoperator"); err != nil {
			return err
		}
	}
	args := append([]string{"-m", "pytest"}, strings.Fields(os.Getenv("PYTEST_FLAGS"))...)
	start := time.Now()
	err = runIn(pythonSDKDir, map[string]string{"OPF_TESTOPERATOR": operator}, py, args...)
	fmt.Printf("[python] pytest: %s\n", time.Since(start).Round(time.Second))
	if err != nil {
		return errors.New("python tests failed")
	}
	return nil
}

// pythonDemoPlugin makes sure the virtual environment exists and returns
// the command line that starts the Python demo plugin (the validator of
// examples/, in Python); it connects to the operator at $OPF_DEMO_TARGET.
func pythonDemoPlugin() ([]string, error) {
	py, err := pythonVenv()
	if err != nil {
		return nil, err
	}
	return []string{py, absPath(pythonSDKDir, "examples", "validator.py")}, nil
}
