package server

import (
	"errors"
	"fmt"
	"net"
	"runtime"

	"github.com/prometheus/procfs"
)

// AnyUID, given to WithLocalProxy, accepts a local proxy whatever user it
// runs as: only its address is checked.
const AnyUID = -1

// localProxy is what WithLocalProxy sets.
type localProxy struct {
	enabled bool
	uid     int
}

// checkListener reports a listen address a local proxy cannot be told
// apart on: anything but TCP on exactly 127.0.0.1 or ::1. A wildcard or a
// pod address would let other pods connect; another loopback address
// (127.0.0.6, which service meshes use for inbound traffic) is not where
// the proxy dials.
func (lp localProxy) checkListener(addr net.Addr) error {
	if !lp.enabled {
		return nil
	}
	tcp, ok := addr.(*net.TCPAddr)
	if !ok || !(tcp.IP.Equal(net.IPv4(127, 0, 0, 1)) || tcp.IP.Equal(net.IPv6loopback)) {
		return fmt.Errorf("plugin server: WithLocalProxy needs a listener on exactly 127.0.0.1 or [::1], not %s %s", addr.Network(), addr)
	}
	if lp.uid >= 0 && runtime.GOOS != "linux" {
		return fmt.Errorf("plugin server: WithLocalProxy(%d) checks the proxy's user in /proc/net, which %s does not have: use AnyUID", lp.uid, runtime.GOOS)
	}
	return nil
}

// checkConn refuses a connection that does not come from the local proxy:
// its source address must be the listener's own (the proxy dials
// 127.0.0.1 and the kernel gives it that source; another process can
// choose 127.0.0.6), and its socket must belong to the proxy's user.
func (lp localProxy) checkConn(c net.Conn) error {
	local, ok1 := c.LocalAddr().(*net.TCPAddr)
	remote, ok2 := c.RemoteAddr().(*net.TCPAddr)
	if !ok1 || !ok2 {
		return errors.New("not a TCP connection")
	}
	if !remote.IP.Equal(local.IP) {
		return fmt.Errorf("source address %s is not %s, where the local proxy connects from", remote.IP, local.IP)
	}
	if lp.uid < 0 {
		return nil
	}
	uid, err := socketOwner(remote, local)
	if err != nil {
		return fmt.Errorf("cannot tell who opened the connection: %w", err)
	}
	if uid != uint64(lp.uid) {
		return fmt.Errorf("the connection's socket belongs to user %d, not to the proxy's user %d", uid, lp.uid)
	}
	return nil
}

// socketOwner returns the user owning the TCP socket bound to local and
// connected to remote, from the kernel's socket table of this network
// namespace (the pod's: every container of a pod shares it). procfs marks
// its /proc/net/tcp parser deprecated in favour of netlink for hosts with
// huge tables; a pod's table is small and this runs once per connection
// behind a local proxy, which multiplexes many tunnels on each.
func socketOwner(local, remote *net.TCPAddr) (uint64, error) {
	fs, err := procfs.NewDefaultFS()
	if err != nil {
		return 0, err
	}
	//lint:ignore SA1019 the netlink alternative is for hosts with huge socket tables; a pod's is small (see above)
	table := fs.NetTCP
	if local.IP.To4() == nil {
		//lint:ignore SA1019 as above
		table = fs.NetTCP6
	}
	lines, err := table()
	if err != nil {
		return 0, err
	}
	for _, l := range lines {
		if l.LocalPort == uint64(local.Port) && l.RemPort == uint64(remote.Port) && l.LocalAddr.Equal(local.IP) && l.RemAddr.Equal(remote.IP) {
			return l.UID, nil
		}
	}
	return 0, fmt.Errorf("no socket %s -> %s in the kernel's table", local, remote)
}

// WithLocalProxy is for a server behind a proxy in its own pod, such as
// kube-rbac-proxy (auth.BehindKubeRBACProxy sets it): only that proxy may
// connect, since it vouches for the callers' identity in headers.
//
// Start fails unless the server listens on TCP at exactly 127.0.0.1 or
// ::1, and every connection is closed as soon as it is accepted unless it
// comes from that same address and, when uid is not AnyUID, from a socket
// owned by uid: the user the proxy's container runs as (its runAsUser),
// which the server reads in the kernel's socket table (Linux). Other
// processes that can reach the pod's loopback interface, such as other
// containers of the pod, ephemeral debug containers or a service mesh's
// sidecar (whose inbound traffic comes from 127.0.0.6), are refused,
// unless they run as the proxy's user. Refusals are counted in
// plugin_framework_server_connections_refused_total{reason="peer"}.
func WithLocalProxy(uid int) Option {
	return optionFunc(func(c *config) { c.localProxy = localProxy{enabled: true, uid: uid} })
}
