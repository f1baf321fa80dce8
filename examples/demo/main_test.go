package main

import (
	"bytes"
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	// The demo starts its own binary as the plugin: here, the test binary.
	if len(os.Args) > 1 && os.Args[1] == pluginCommand {
		if err := runPlugin(os.Stdout); err != nil {
			os.Stderr.WriteString("plugin: " + err.Error() + "\n")
			os.Exit(1)
		}
		os.Exit(0)
	}
	goleak.VerifyTestMain(m)
}

// TestDemo runs the whole demo, a plugin process included, and checks what
// it printed.
func TestDemo(t *testing.T) {
	for _, verbose := range []bool{false, true} {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		var out bytes.Buffer
		start := time.Now()
		err := run(ctx, &out, verbose)
		cancel()
		t.Logf("verbose=%v: %s\n%s", verbose, time.Since(start), out.String())
		if err != nil {
			t.Fatal(err)
		}
		for _, want := range []string{
			`registry: plugin "validator" connected, instance validator-1`,
			"x-deadline-left=",
			"x-request-id=demo-1",
			"x-rules-evaluated=3",
			"rule dns-label-name",
			"checked 3, denied 2",
			"shop/web: allowed",
			"status InvalidArgument: resource.name is required",
			"field resource.name: is required",
			"status DeadlineExceeded",
			"plugin    draining",
			"registry: instance validator-1 left",
			"exited with status 0",
			"operator  stopped",
		} {
			if !strings.Contains(out.String(), want) {
				t.Errorf("verbose=%v: output lacks %q", verbose, want)
			}
		}
		for _, alarming := range []string{"rpc error", "reconnecting", "panic", "fail"} {
			// With -v the operator's own logs are shown, as they are.
			if !verbose && strings.Contains(out.String(), alarming) {
				t.Errorf("verbose=%v: output contains %q", verbose, alarming)
			}
		}
	}
}

// TestDemoCancelled checks that a demo cut short fails, having stopped its
// plugin process and, as TestMain checks, leaving no goroutine behind.
func TestDemoCancelled(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	var out bytes.Buffer
	if err := run(ctx, &out, true); err == nil {
		t.Fatalf("run succeeded with an expired context:\n%s", out.String())
	}
}
