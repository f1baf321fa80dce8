package conformance

import (
	"bytes"
	"context"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestCasesLoad(t *testing.T) {
	cases, err := LoadCases()
	if err != nil {
		t.Fatal(err)
	}
	if len(cases) < 50 {
		t.Fatalf("only %d cases", len(cases))
	}
	names := map[string]bool{}
	for _, c := range cases {
		names[c.Name] = true
	}
	// The cases the issue asks for, at least one each.
	for _, prefix := range []string{
		"registration/accepted", "registration/second-instance", "registration/rejected",
		"unary/echo", "unary/empty-message", "unary/8mib", "status/", "errors/unknown-method",
		"errors/unknown-service", "errors/handler-panic", "metadata/headers-and-trailers",
		"deadline/seen-by-handler", "cancel/", "server-stream/zero", "client-stream/zero",
		"bidi/zero", "server-stream/error-mid-stream", "client-stream/error-mid-stream",
		"bidi/error-mid-stream", "concurrency/100-calls", "flow/stalled-consumer",
		"limits/oversized", "lifecycle/operator-restart", "lifecycle/operator-drain",
		"heartbeat/plugin-detects-silence", "heartbeat/operator-detects-silence",
		"raw-operator/malformed-frame", "raw-operator/unknown-stream", "raw-operator/window-overrun",
		"raw-operator/open-before-register-ack", "raw-plugin/open-before-registration",
		"raw-plugin/malformed-frame", "raw-plugin/unknown-stream-ids", "raw-plugin/window-overrun",
	} {
		found := false
		for n := range names {
			if strings.HasPrefix(n, prefix) {
				found = true
			}
		}
		if !found {
			t.Errorf("no case named %s*", prefix)
		}
	}
	statuses := 0
	for n := range names {
		if strings.HasPrefix(n, "status/") {
			statuses++
		}
	}
	if statuses != 17 {
		t.Errorf("%d status cases, want one per code (17)", statuses)
	}
	for _, sdk := range []string{"go", "python", "rust"} {
		kf, err := KnownFailing(sdk)
		if err != nil {
			t.Fatalf("%s: %v", sdk, err)
		}
		for name := range kf {
			if !names[name] {
				t.Errorf("known_failing/%s.txt lists %q, which is no case", sdk, name)
			}
		}
	}
}

func TestParseCasesRejectsMistakes(t *testing.T) {
	for _, bad := range []string{
		"- {name: a/b, checks: x, steps: [{sleep: 1s, send: []}]}",  // two actions
		"- {name: a/b, checks: x, steps: [{call: {method: Nope}}]}", // unknown method
		"- {name: a/b, checks: x, steps: [{call: {method: Unary, typo: 1}}]}",
		"- {name: a/b, checks: '', steps: [{sleep: 1s}]}",          // no checks
		"- {name: Bad, checks: x, steps: [{sleep: 1s}]}",           // name
		"- {name: a/b, checks: x, steps: [{accept: {}}]}",          // accept needs the raw operator
		"- {name: a/b, checks: x, steps: [{send: [{stream: 1}]}]}", // no frame kind
		"- {name: a/b, checks: x, steps: [{send: [{bogus: {}}]}]}", // unknown kind
		"- {name: a/b, checks: x, steps: [{call: {method: Unary, expect: {code: NOPE}}}]}",
	} {
		if _, err := parseCases("test.yaml", []byte(bad)); err == nil {
			t.Errorf("accepted %s", bad)
		}
	}
}

func TestMatch(t *testing.T) {
	got := map[string]any{
		"n": int64(3), "s": "text", "d": "1.5s", "l": []any{"a", "b"}, "nil": nil, "b": false,
		"m": map[string]any{"x": int64(1)},
	}
	for _, want := range []string{
		`{n: 3}`, `{n: "3"}`, `{s: text}`, `{d: 1500ms}`, `{d: {$between: [1s, 2s]}}`,
		`{l: [a, b]}`, `{l: {$contains: [b]}}`, `{l: {$len: 2}}`, `{s: {$contains: ex}}`,
		`{nil: null}`, `{b: false}`, `{absent: null}`, `{m: {x: 1}}`, `{n: {$not: 4}}`,
	} {
		if err := match("", yamlValue(t, want), got); err != nil {
			t.Errorf("%s: %v", want, err)
		}
	}
	for _, want := range []string{
		`{n: 4}`, `{s: other}`, `{d: {$between: [2s, 3s]}}`, `{l: [a]}`, `{l: {$contains: [c]}}`,
		`{absent: 1}`, `{nil: 1}`, `{m: {x: 2}}`, `{n: {$not: 3}}`,
	} {
		if err := match("", yamlValue(t, want), got); err == nil {
			t.Errorf("%s matched", want)
		}
	}
}

func yamlValue(t *testing.T, s string) any {
	t.Helper()
	cs, err := parseCases("v.yaml", []byte("- {name: a/b, checks: x, steps: [{call: {method: Unary, expect: {response: "+s+"}}}]}"))
	if err != nil {
		t.Fatal(err)
	}
	return cs[0].Steps[0].Call.Expect.Response
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int{"10": 10, "8MiB": 8 << 20, "2MiB+1": 2<<20 + 1, "4MiB-64": 4<<20 - 64, "64KiB": 64 << 10} {
		if got, err := parseSize(in); err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	if _, err := parseSize("lots"); err == nil {
		t.Error("parseSize(lots) succeeded")
	}
}

func TestSplitCommand(t *testing.T) {
	got, err := SplitCommand(`python3 -m "my plugin" 'a b' c\ d`)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"python3", "-m", "my plugin", "a b", "c d"}; !slices.Equal(got, want) {
		t.Fatalf("got %q, want %q", got, want)
	}
	if _, err := SplitCommand(`"open`); err == nil {
		t.Error("unterminated quote accepted")
	}
}

// TestGoPlugin runs a few cases end to end against the Go plugin, and
// checks that a known-failing case that passes fails the run.
func TestGoPlugin(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the Go plugin")
	}
	plugin := filepath.Join(t.TempDir(), "plugin-go")
	build := exec.Command("go", "build", "-o", plugin, "./plugins/go")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	var out bytes.Buffer
	sum, err := Run(ctx, Config{
		SDKs:   []SDK{{Name: "go", Command: []string{plugin}, OperatorCases: true}},
		Filter: regexp.MustCompile(`^(unary/echo|status/aborted|metadata/headers-and-trailers|cancel/unary-seen-by-handler|raw-operator/open-before-register-ack|raw-plugin/unknown-stream-ids)$`),
		Out:    &out,
	})
	if err != nil {
		t.Fatal(err)
	}
	if !sum.OK() || len(sum.Results) != 6 {
		t.Fatalf("%d results, ok=%v:\n%s", len(sum.Results), sum.OK(), out.String())
	}
	if !strings.HasSuffix(out.String(), "go: 6 passed, 0 failed\ntotal: 6 passed, 0 failed\n") {
		t.Fatalf("summary lines:\n%s", out.String())
	}

	out.Reset()
	sum, err = Run(ctx, Config{
		SDKs:   []SDK{{Name: "go", Command: []string{plugin}, KnownFailing: map[string]string{"unary/echo": "test"}}},
		Filter: regexp.MustCompile(`^unary/echo$`),
		Out:    &out,
	})
	if err != nil {
		t.Fatal(err)
	}
	if sum.OK() || !strings.Contains(out.String(), "known-failing list") || !strings.Contains(out.String(), "go: 0 passed, 1 failed") {
		t.Fatalf("a known-failing case that passes must fail the run:\n%s", out.String())
	}
}
