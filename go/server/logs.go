package server

import (
	"sync"

	"github.com/go-logr/logr"
	"golang.org/x/time/rate"
)

// Peers decide how often the server logs about them (a refused
// registration, a protocol error): each message is logged at most
// logBurst times at once and logRate times a second after that, so that
// no peer can flood the operator's log. The next line of a message that
// was dropped says how many were ("suppressed").
const (
	logRate     = rate.Limit(5)
	logBurst    = 20
	maxMessages = 256 // distinct messages tracked; the rest share one budget
)

// rateLimited returns lg with the limit above.
func rateLimited(lg logr.Logger) logr.Logger {
	sink := lg.GetSink()
	if sink == nil {
		return lg
	}
	if cd, ok := sink.(logr.CallDepthLogSink); ok {
		sink = cd.WithCallDepth(1) // our frame
	}
	return logr.New(&limitedSink{sink: sink, lim: &messageLimiter{byMsg: map[string]*messageBudget{}}}).V(lg.GetV())
}

type messageLimiter struct {
	mu    sync.Mutex
	byMsg map[string]*messageBudget
}

type messageBudget struct {
	lim     *rate.Limiter
	dropped int
}

// allow reports whether a line of msg may be logged now, and how many
// were dropped since the last one that was.
func (l *messageLimiter) allow(msg string) (bool, int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	b := l.byMsg[msg]
	if b == nil {
		if len(l.byMsg) >= maxMessages {
			msg = ""
			b = l.byMsg[msg]
		}
		if b == nil {
			b = &messageBudget{lim: rate.NewLimiter(logRate, logBurst)}
			l.byMsg[msg] = b
		}
	}
	if !b.lim.Allow() {
		b.dropped++
		logsSuppressed.Inc()
		return false, 0
	}
	n := b.dropped
	b.dropped = 0
	return true, n
}

// limitedSink applies a messageLimiter, shared by every logger derived
// from it, to a sink.
type limitedSink struct {
	sink logr.LogSink
	lim  *messageLimiter
}

// Init does nothing: the wrapped sink was initialised by its own logger.
func (s *limitedSink) Init(logr.RuntimeInfo) {}

func (s *limitedSink) Enabled(level int) bool { return s.sink.Enabled(level) }

func (s *limitedSink) Info(level int, msg string, kv ...any) {
	ok, dropped := s.lim.allow(msg)
	if !ok {
		return
	}
	if dropped > 0 {
		kv = append(kv, "suppressed", dropped)
	}
	s.sink.Info(level, msg, kv...)
}

func (s *limitedSink) Error(err error, msg string, kv ...any) {
	ok, dropped := s.lim.allow(msg)
	if !ok {
		return
	}
	if dropped > 0 {
		kv = append(kv, "suppressed", dropped)
	}
	s.sink.Error(err, msg, kv...)
}

func (s *limitedSink) WithValues(kv ...any) logr.LogSink {
	return &limitedSink{sink: s.sink.WithValues(kv...), lim: s.lim}
}

func (s *limitedSink) WithName(name string) logr.LogSink {
	return &limitedSink{sink: s.sink.WithName(name), lim: s.lim}
}
