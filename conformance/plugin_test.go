package conformance

import (
	"strings"
	"testing"
	"time"
)

// TestTerminateSignalsOnce: the case's stop_plugin and the end-of-case
// cleanup both terminate a plugin; it must receive one SIGTERM, as from a
// kubelet, or a second one can kill a plugin that is already exiting.
func TestTerminateSignalsOnce(t *testing.T) {
	p, err := startPlugin(0, []string{"sh", "-c", `trap 'echo TERM' TERM; echo ready; while :; do sleep 0.01; done`}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer p.kill()
	waitOutput(t, p, "ready")
	p.terminate()
	waitOutput(t, p, "TERM")
	p.terminate()
	time.Sleep(200 * time.Millisecond) // the shell runs its trap within one sleep
	if n := strings.Count(p.output.String(), "TERM"); n != 1 {
		t.Fatalf("plugin got %d SIGTERMs, want 1:\n%s", n, p.output.String())
	}
}

func waitOutput(t *testing.T, p *pluginProc, s string) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !strings.Contains(p.output.String(), s); {
		if time.Now().After(deadline) {
			t.Fatalf("no %q from the plugin:\n%s", s, p.output.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestStuckPluginIsAskedWhereItIs: a plugin that outlives the grace period
// gets SIGQUIT before SIGKILL, and what it prints is in its output.
func TestStuckPluginIsAskedWhereItIs(t *testing.T) {
	p, err := startPlugin(0, []string{"sh", "-c", `trap '' TERM; trap 'echo stuck here' QUIT; echo ready; while :; do sleep 0.01; done`}, nil)
	if err != nil {
		t.Fatal(err)
	}
	waitOutput(t, p, "ready")
	p.terminate()
	if err := p.wait(100 * time.Millisecond); err == nil || !strings.Contains(err.Error(), "did not exit") {
		t.Fatalf("wait: %v, want a plugin that did not exit", err)
	}
	if !strings.Contains(p.output.String(), "stuck here") {
		t.Fatalf("no answer to SIGQUIT in the output:\n%s", p.output.String())
	}
}
