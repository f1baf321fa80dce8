//go:build mage

// The conformance suite (conformance/, docs/conformance.md): one suite of
// tunnel cases, played against the plugin program of every SDK in the tree.

package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// conformanceSDK is an SDK's plugin program under test: how to build it
// and the command that runs it, from the repository root.
type conformanceSDK struct {
	name  string
	dir   string // present when the SDK is in the tree
	build func() error
	cmd   func() (string, error)
}

// conformanceSDKs lists the SDKs the suite knows. Python and Rust are hooks
// for when their SDKs land; docs/conformance.md describes what each must
// provide.
func conformanceSDKs() []conformanceSDK {
	return []conformanceSDK{
		{
			name: "go",
			dir:  "go",
			build: func() error {
				return runIn("conformance", nil, "go", "build", "-o", absPath(binDir, "conformance-plugin-go"), "./plugins/go")
			},
			cmd: func() (string, error) { return absPath(binDir, "conformance-plugin-go"), nil },
		},
		{
			name: "python",
			dir:  filepath.Join("sdk", "python"),
			cmd: func() (string, error) {
				script := absPath("sdk", "python", "conformance_plugin.py")
				if _, err := os.Stat(script); err != nil {
					return "", fmt.Errorf("sdk/python has no conformance_plugin.py (docs/conformance.md, \"Adding an SDK\"): %w", err)
				}
				py, err := pythonVenv() // magefile_python.go
				if err != nil {
					return "", err
				}
				return fmt.Sprintf("'%s' '%s'", py, script), nil
			},
		},
		{
			name: "rust",
			dir:  filepath.Join("sdk", "rust"),
			build: func() error {
				_, err := rustConformancePlugin() // magefile_rust.go
				return err
			},
			cmd: func() (string, error) {
				return rustBin("conformance-plugin"), nil
			},
		},
	}
}

// Conformance builds the conformance runner and the plugin program of every
// SDK present in the tree (go, sdk/python, sdk/rust),
// then runs the suite against all of them. CONFORMANCE_FLAGS adds runner
// flags, for example CONFORMANCE_FLAGS='--run ^raw- -v'.
func Conformance(ctx context.Context) error {
	if err := os.MkdirAll(binDir, 0o755); err != nil {
		return err
	}
	runner := absPath(binDir, "conformance")
	if err := runIn("conformance", nil, "go", "build", "-o", runner, "./cmd/conformance"); err != nil {
		return err
	}
	args, err := pluginCommands("--plugin-cmd", func(string) bool { return true })
	if err != nil {
		return err
	}
	args = append(args, strings.Fields(os.Getenv("CONFORMANCE_FLAGS"))...)
	if err := runIn(".", nil, runner, args...); err != nil {
		return errors.New("conformance suite failed")
	}
	return nil
}

func absPath(elem ...string) string {
	p, _ := filepath.Abs(filepath.Join(elem...))
	return p
}

// pluginCommands builds the conformance plugins of the SDKs in the tree
// that include accepts and returns, for each, flag and NAME=COMMAND.
func pluginCommands(flag string, include func(name string) bool) ([]string, error) {
	var args []string
	for _, sdk := range conformanceSDKs() {
		if !include(sdk.name) {
			continue
		}
		if _, err := os.Stat(sdk.dir); errors.Is(err, os.ErrNotExist) {
			continue
		}
		if sdk.build != nil {
			if err := sdk.build(); err != nil {
				return nil, fmt.Errorf("building the %s plugin: %w", sdk.name, err)
			}
		}
		cmd, err := sdk.cmd()
		if err != nil {
			return nil, err
		}
		args = append(args, flag, sdk.name+"="+cmd)
	}
	return args, nil
}
