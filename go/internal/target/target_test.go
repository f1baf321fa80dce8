package target

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	long := "/" + strings.Repeat("x", MaxUnixPath)
	for _, c := range []struct {
		in      string
		kind    Kind
		host    string
		wantErr string
	}{
		{in: "unix:///run/op.sock", kind: Unix},
		{in: "unix:/run/op.sock", kind: Unix},
		{in: "unix://" + long[:MaxUnixPath], kind: Unix},
		{in: "dns:///operator.ns.svc:7443", kind: DNS, host: "operator.ns.svc"},
		{in: "operator:7443", kind: DNS, host: "operator"},
		{in: "tcp://127.0.0.1:7443", kind: DNS, host: "127.0.0.1"},
		{in: "[::1]:7443", kind: DNS, host: "::1"},
		{in: "ipv4:127.0.0.2:7443,127.0.0.3:7443", kind: Static},
		{in: "ipv6:[::1]:7443", kind: Static},

		{in: "", wantErr: "empty"},
		{in: "http://localhost:1234", wantErr: `scheme "http" is not supported`},
		{in: "unix://run/operator.sock", wantErr: "must be absolute: unix:///run/operator.sock"},
		{in: "unix:run/x.sock", wantErr: "must be absolute"},
		{in: "unix://" + long, wantErr: "more than the 107"},
		{in: "dns://8.8.8.8/operator:7443", wantErr: "not supported"},
		{in: "operator", wantErr: "not HOST:PORT"},
		{in: ":7443", wantErr: "no host"},
		{in: "operator:0", wantErr: "from 1 to 65535"},
		{in: "operator:http", wantErr: "from 1 to 65535"},
		{in: "ipv4:[::1]:7443", wantErr: "not an IPv4"},
		{in: "ipv4:127.0.0.1", wantErr: "not an IPv4"},
		{in: "ipv6:127.0.0.1:1", wantErr: "not an IPv6"},
	} {
		got, err := Parse(c.in)
		if c.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), c.wantErr) || !strings.Contains(err.Error(), Forms) {
				t.Errorf("Parse(%q) = %v, want an error containing %q and the forms", c.in, err, c.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("Parse(%q): %v", c.in, err)
			continue
		}
		if got.Kind != c.kind || got.Host != c.host || got.String() != c.in {
			t.Errorf("Parse(%q) = %+v", c.in, got)
		}
	}
}

func TestParseListen(t *testing.T) {
	for _, c := range []struct{ in, network, address, wantErr string }{
		{in: "unix:///run/op.sock", network: "unix", address: "/run/op.sock"},
		{in: "tcp://127.0.0.1:7443", network: "tcp", address: "127.0.0.1:7443"},
		{in: ":7443", network: "tcp", address: ":7443"},
		{in: "127.0.0.1:0", network: "tcp", address: "127.0.0.1:0"},
		{in: "unix://run/x.sock", wantErr: "must be absolute"},
		{in: "https://x:1", wantErr: "not supported"},
		{in: "dns:///x:1", wantErr: "not supported"},
	} {
		n, a, err := ParseListen(c.in)
		if c.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), c.wantErr) {
				t.Errorf("ParseListen(%q) = %v, want an error containing %q", c.in, err, c.wantErr)
			}
			continue
		}
		if err != nil || n != c.network || a != c.address {
			t.Errorf("ParseListen(%q) = %q, %q, %v", c.in, n, a, err)
		}
	}
}

func TestResolve(t *testing.T) {
	lookup := func(_ context.Context, host string) ([]string, error) {
		if host == "operator-headless" {
			return []string{"10.0.0.3", "10.0.0.2", "10.0.0.3", "::ffff:10.0.0.4"}, nil
		}
		return nil, errors.New("no such host")
	}
	for _, c := range []struct {
		in   string
		want []string
	}{
		{"unix:///run/op.sock", []string{"unix:///run/op.sock"}},
		{"dns:///operator-headless:7443", []string{"passthrough:///10.0.0.2:7443", "passthrough:///10.0.0.3:7443", "passthrough:///10.0.0.4:7443"}},
		{"127.0.0.1:7443", []string{"passthrough:///127.0.0.1:7443"}},
		{"ipv4:127.0.0.3:1,127.0.0.2:1,127.0.0.3:1", []string{"passthrough:///127.0.0.2:1", "passthrough:///127.0.0.3:1"}},
	} {
		tg, err := Parse(c.in)
		if err != nil {
			t.Fatal(err)
		}
		got, err := tg.Resolve(context.Background(), lookup)
		if err != nil || !slices.Equal(got, c.want) {
			t.Errorf("Resolve(%q) = %v, %v, want %v", c.in, got, err, c.want)
		}
	}
	tg, _ := Parse("missing:1")
	if _, err := tg.Resolve(context.Background(), lookup); err == nil || !strings.Contains(err.Error(), "missing") {
		t.Errorf("Resolve of an unknown host: %v", err)
	}
}

func TestLocal(t *testing.T) {
	for in, want := range map[string]bool{
		"unix:///run/x.sock":          true,
		"localhost:1":                 true,
		"127.0.0.1:1":                 true,
		"[::1]:1":                     true,
		"ipv4:127.0.0.2:1":            true,
		"ipv4:127.0.0.2:1,10.0.0.1:1": false,
		"operator:1":                  false,
		"10.0.0.1:1":                  false,
	} {
		tg, err := Parse(in)
		if err != nil {
			t.Fatal(err)
		}
		if got := tg.Local(); got != want {
			t.Errorf("Local(%q) = %v, want %v", in, got, want)
		}
	}
}
