// Package target parses the addresses of the framework: the target a plugin
// dials (docs/tunnel-spec.md 14.1) and the address the operator's server
// listens on. Both sides validate with it, once, when they are created, so
// that an address that can never work fails at once with a message that
// names the forms that do.
package target

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
)

// MaxUnixPath is the longest unix socket path the system takes: the size of
// sun_path (108 on Linux) less its final NUL.
const MaxUnixPath = 107

// Forms lists the plugin targets, for error messages.
const Forms = "unix:///ABSOLUTE/PATH, dns:///HOST:PORT, HOST:PORT, tcp://HOST:PORT, ipv4:ADDR:PORT[,ADDR:PORT...] or ipv6:[ADDR]:PORT[,...]"

// ListenForms lists the server's listen addresses, for error messages.
const ListenForms = "unix:///ABSOLUTE/PATH, tcp://HOST:PORT or HOST:PORT"

// Kind says how a target's addresses are found.
type Kind uint8

const (
	// Unix is one unix socket.
	Unix Kind = iota + 1
	// DNS is every address a host name resolves to (or one IP literal).
	DNS
	// Static is a fixed list of IP addresses (ipv4:, ipv6:).
	Static
)

// Target is a parsed plugin target.
type Target struct {
	Kind Kind
	// Path is the socket of a Unix target.
	Path string
	// Host and Port are a DNS target's; Host is also the name TLS verifies
	// by default (empty for Unix and Static targets).
	Host, Port string
	// Addrs are a Static target's "IP:PORT" addresses.
	Addrs []string
	raw   string
}

func (t Target) String() string { return t.raw }

// Parse validates a plugin target.
func Parse(s string) (Target, error) {
	t := Target{raw: s}
	fail := func(why string) (Target, error) {
		return Target{}, fmt.Errorf("plugin target %q: %s (want %s)", s, why, Forms)
	}
	switch {
	case s == "":
		return fail("empty")
	case strings.HasPrefix(s, "unix:"):
		path, err := unixPath(s)
		if err != nil {
			return fail(err.Error())
		}
		t.Kind, t.Path = Unix, path
		return t, nil
	case strings.HasPrefix(s, "ipv4:"), strings.HasPrefix(s, "ipv6:"):
		v6 := strings.HasPrefix(s, "ipv6:")
		for a := range strings.SplitSeq(s[len("ipv4:"):], ",") {
			ap, err := netip.ParseAddrPort(a)
			if err != nil || ap.Port() == 0 || ap.Addr().Is6() != v6 || ap.Addr().Zone() != "" {
				return fail(fmt.Sprintf("%q is not an IPv%s address with a port", a, map[bool]string{false: "4", true: "6"}[v6]))
			}
			t.Addrs = append(t.Addrs, ap.String())
		}
		t.Kind = Static
		return t, nil
	}
	hostport := s
	if rest, ok := strings.CutPrefix(s, "dns:"); ok {
		after, ok := strings.CutPrefix(rest, "///")
		if !ok {
			return fail("a DNS target is dns:///HOST:PORT; choosing a DNS server (dns://SERVER/...) is not supported")
		}
		hostport = after
	} else if rest, ok := strings.CutPrefix(s, "tcp://"); ok {
		hostport = rest
	} else if i := strings.Index(s, "://"); i >= 0 {
		return fail(fmt.Sprintf("scheme %q is not supported", s[:i]))
	}
	host, port, err := hostPort(hostport, false)
	if err != nil {
		return fail(err.Error())
	}
	t.Kind, t.Host, t.Port = DNS, host, port
	return t, nil
}

// ParseListen validates the operator server's listen address and returns
// what net.Listen takes.
func ParseListen(s string) (network, address string, err error) {
	fail := func(why string) (string, string, error) {
		return "", "", fmt.Errorf("listen address %q: %s (want %s)", s, why, ListenForms)
	}
	switch {
	case s == "":
		return fail("empty")
	case strings.HasPrefix(s, "unix:"):
		path, err := unixPath(s)
		if err != nil {
			return fail(err.Error())
		}
		return "unix", path, nil
	}
	hostport := s
	if rest, ok := strings.CutPrefix(s, "tcp://"); ok {
		hostport = rest
	} else if i := strings.Index(s, "://"); i >= 0 {
		return fail(fmt.Sprintf("scheme %q is not supported", s[:i]))
	}
	host, port, err := hostPort(hostport, true)
	if err != nil {
		return fail(err.Error())
	}
	return "tcp", net.JoinHostPort(host, port), nil
}

// unixPath takes the absolute path of unix:///PATH or unix:/PATH.
func unixPath(s string) (string, error) {
	rest := strings.TrimPrefix(s, "unix:")
	path, ok := strings.CutPrefix(rest, "//")
	if !ok {
		path = rest
	}
	switch {
	case path == "":
		return "", fmt.Errorf("no socket path")
	case !strings.HasPrefix(path, "/"):
		if ok { // unix://run/x.sock: "run" reads as an authority
			return "", fmt.Errorf("the socket path must be absolute: unix:///%s", path)
		}
		return "", fmt.Errorf("the socket path must be absolute")
	case len(path) > MaxUnixPath:
		return "", fmt.Errorf("the socket path is %d bytes long, more than the %d a unix socket allows", len(path), MaxUnixPath)
	}
	return path, nil
}

// hostPort splits HOST:PORT. A listen address may have an empty HOST
// (every interface) and port 0 (any free port).
func hostPort(s string, listen bool) (string, string, error) {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return "", "", fmt.Errorf("not HOST:PORT")
	}
	if host == "" && !listen {
		return "", "", fmt.Errorf("no host")
	}
	if strings.ContainsAny(host, "/ ") {
		return "", "", fmt.Errorf("%q is not a host name", host)
	}
	low := 1
	if listen {
		low = 0
	}
	if n, err := strconv.Atoi(port); err != nil || n < low || n > 65535 || strconv.Itoa(n) != port {
		return "", "", fmt.Errorf("port %q is not a number from %d to 65535", port, low)
	}
	return host, port, nil
}

// LookupHost resolves a host name to IP addresses, as
// net.Resolver.LookupHost does.
type LookupHost func(ctx context.Context, host string) ([]string, error)

// Resolve returns the addresses to dial, as gRPC targets, deduplicated and
// sorted so that their order is stable (spec 14.2): the socket of a Unix
// target, the IP addresses of a Static one, what lookup returns for a DNS
// host (or the host itself when it is an IP literal).
func (t Target) Resolve(ctx context.Context, lookup LookupHost) ([]string, error) {
	var addrs []string
	switch t.Kind {
	case Unix:
		return []string{"unix://" + t.Path}, nil
	case Static:
		addrs = slices.Clone(t.Addrs)
	case DNS:
		if ip, err := netip.ParseAddr(t.Host); err == nil {
			addrs = []string{netip.AddrPortFrom(ip, mustPort(t.Port)).String()}
			break
		}
		if lookup == nil {
			lookup = net.DefaultResolver.LookupHost
		}
		ips, err := lookup(ctx, t.Host)
		if err != nil {
			return nil, fmt.Errorf("resolve %s: %w", t.Host, err)
		}
		for _, ip := range ips {
			a, err := netip.ParseAddr(ip)
			if err != nil {
				continue
			}
			addrs = append(addrs, netip.AddrPortFrom(a.Unmap(), mustPort(t.Port)).String())
		}
		if len(addrs) == 0 {
			return nil, fmt.Errorf("resolve %s: no address", t.Host)
		}
	}
	slices.Sort(addrs)
	addrs = slices.Compact(addrs)
	for i, a := range addrs {
		addrs[i] = "passthrough:///" + a
	}
	return addrs, nil
}

func mustPort(p string) uint16 {
	n, _ := strconv.Atoi(p) // validated by Parse
	return uint16(n)
}

// Local reports whether every address of t is on this machine: a unix
// socket, "localhost" or a loopback IP. A plaintext token may be sent only
// to such a target.
func (t Target) Local() bool {
	switch t.Kind {
	case Unix:
		return true
	case DNS:
		if strings.EqualFold(t.Host, "localhost") {
			return true
		}
		ip, err := netip.ParseAddr(t.Host)
		return err == nil && ip.IsLoopback()
	case Static:
		for _, a := range t.Addrs {
			if !netip.MustParseAddrPort(a).Addr().IsLoopback() {
				return false
			}
		}
		return true
	}
	return false
}
