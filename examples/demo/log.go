package main

import (
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"

	"github.com/go-logr/logr"
)

// syncWriter serialises writes: the demo's own lines, the operator's logs
// and the plugin process's output all go to one writer.
type syncWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (s *syncWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.Write(p)
}

// printf prints one line of the demo's own, after a column naming who
// speaks: "demo", "operator" or "plugin".
func printf(w io.Writer, who, format string, args ...any) {
	fmt.Fprintf(w, "%-9s %s\n", who, fmt.Sprintf(format, args...))
}

// newLogger returns a logger that prints the framework's informational
// logs (verbosity 0) as "who  message key=value ..." lines, leaving out
// empty values and the keys in hiddenKeys.
func newLogger(w io.Writer, who string) logr.Logger {
	return logr.New(lineSink{w: w, who: who})
}

// hiddenKeys are logged with the same value on every line of the
// operator side's.
var hiddenKeys = []string{"component", "address"}

type lineSink struct {
	w      io.Writer
	who    string
	values []any
}

func (s lineSink) Init(logr.RuntimeInfo) {}

func (s lineSink) Enabled(level int) bool { return level == 0 }

func (s lineSink) Info(_ int, msg string, kv ...any) { s.print(msg, kv) }

func (s lineSink) Error(err error, msg string, kv ...any) {
	s.print(msg, append(kv, "error", err))
}

func (s lineSink) WithValues(kv ...any) logr.LogSink {
	s.values = append(slices.Clip(s.values), kv...)
	return s
}

func (s lineSink) WithName(string) logr.LogSink { return s }

func (s lineSink) print(msg string, kv []any) {
	var b strings.Builder
	b.WriteString(msg)
	all := append(slices.Clip(s.values), kv...)
	for i := 0; i+1 < len(all); i += 2 {
		v := fmt.Sprint(all[i+1])
		if v == "" || v == "<nil>" || slices.Contains(hiddenKeys, fmt.Sprint(all[i])) {
			continue
		}
		fmt.Fprintf(&b, " %v=%s", all[i], v)
	}
	printf(s.w, s.who, "%s", b.String())
}
