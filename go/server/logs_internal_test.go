package server

import (
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr/funcr"
)

func TestRateLimitedLogger(t *testing.T) {
	var lines []string
	lg := rateLimited(funcr.New(func(_, args string) { lines = append(lines, args) }, funcr.Options{}).WithValues("k", "v"))
	for range 100 {
		lg.Info("tunnel refused", "n", 1)
	}
	lg.WithValues("more", 1).Info("another message") // a budget of its own
	if len(lines) != logBurst+1 {
		t.Fatalf("%d lines for 100 of one message and 1 of another, want %d", len(lines), logBurst+1)
	}
	if !strings.Contains(lines[0], `"k"="v"`) || !strings.Contains(lines[logBurst], `"more"=1`) {
		t.Fatalf("values lost: %q", lines)
	}
	time.Sleep(time.Second / time.Duration(logRate) * 2)
	lg.Info("tunnel refused")
	last := lines[len(lines)-1]
	if !strings.Contains(last, `"suppressed"=80`) {
		t.Fatalf("the next line after the drops is %q, want it to say 80 were suppressed", last)
	}
}
