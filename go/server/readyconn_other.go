//go:build !unix

package server

import "net"

// withReadOnReady: gRPC pools its read buffers only on unix systems.
func withReadOnReady(c *countedConn) net.Conn { return c }
