package server

import (
	"testing"
	"time"
)

func TestLifetime(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	in := func(d time.Duration) time.Time { return now.Add(d) }
	for _, c := range []struct {
		name    string
		exp     time.Time
		cfg     securityConfig
		jitter  float64
		want    time.Duration
		reason  string
		limited bool
	}{
		{name: "no limit"},
		{name: "max age", cfg: securityConfig{maxAge: 10 * time.Second}, want: 10 * time.Second, reason: "maximum age", limited: true},
		{name: "max age with jitter", cfg: securityConfig{maxAge: 10 * time.Second}, jitter: 0.5, want: 9500 * time.Millisecond, reason: "maximum age", limited: true},
		{name: "default margin", exp: in(10 * time.Minute), want: 9 * time.Minute, reason: "expire", limited: true},
		{name: "margin close to lifetime", exp: in(600 * time.Second), cfg: securityConfig{expiryMargin: 597 * time.Second}, want: 3 * time.Second, reason: "expire", limited: true},
		{name: "margin above lifetime: floor", exp: in(600 * time.Second), cfg: securityConfig{expiryMargin: time.Hour}, want: minTunnelLife, reason: "expire", limited: true},
		{name: "about to expire: half of what is left", exp: in(time.Second), want: 500 * time.Millisecond, reason: "expire", limited: true},
		{name: "expired", exp: in(-time.Second), want: 0, reason: "expire", limited: true},
		{name: "max age first", exp: in(time.Hour), cfg: securityConfig{maxAge: time.Minute}, want: time.Minute, reason: "maximum age", limited: true},
		{name: "expiry first", exp: in(2 * time.Minute), cfg: securityConfig{maxAge: time.Hour}, want: time.Minute, reason: "expire", limited: true},
	} {
		t.Run(c.name, func(t *testing.T) {
			got, reason, ok := lifetime(now, c.exp, c.cfg, c.jitter)
			if ok != c.limited || got != c.want {
				t.Fatalf("got %v %v, want %v %v", got, ok, c.want, c.limited)
			}
			if ok && !contains(reason, c.reason) {
				t.Fatalf("reason %q, want it to mention %q", reason, c.reason)
			}
		})
	}
}

func contains(s, sub string) bool {
	for i := 0; i+len(sub) <= len(s); i++ {
		if s[i:i+len(sub)] == sub {
			return true
		}
	}
	return false
}
