//go:build unix

package server

import (
	"errors"
	"io"
	"net"
	"syscall"

	"google.golang.org/grpc/mem"
)

// withReadOnReady lets gRPC read c without pinning a buffer to it.
//
// Cost: gRPC reads an HTTP/2 connection through a 32 KiB buffer. On a bare
// *net.TCPConn or *net.UnixConn it takes that buffer from a pool only when
// the socket is readable and gives it back once drained, so an idle
// connection holds none; on any other net.Conn it keeps a bufio.Reader for
// the connection's life. countedConn is another net.Conn: without
// ReadOnReady (the optional interface gRPC looks for) every idle tunnel
// would cost the operator 32 KiB more.
func withReadOnReady(c *countedConn) net.Conn {
	switch c.Conn.(type) {
	case *net.TCPConn, *net.UnixConn: // their raw reads are the connection's bytes
	default:
		return c
	}
	sc, ok := c.Conn.(syscall.Conn)
	if !ok {
		return c
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return c
	}
	rc := &readyConn{countedConn: c, raw: raw}
	rc.doRead = rc.read
	return rc
}

// readyConn is a countedConn gRPC reads with ReadOnReady. Only gRPC's
// reader calls ReadOnReady, one call at a time; the state of the call in
// progress lives in the struct, and doRead is made once, so that a read
// allocates nothing.
type readyConn struct {
	*countedConn
	raw    syscall.RawConn
	doRead func(fd uintptr) bool

	size    int
	pool    mem.BufferPool
	buf     *[]byte
	n       int
	readErr error
}

// ReadOnReady waits until the socket is readable, then takes a buffer of
// size bytes from pool and reads into it. The caller owns the buffer
// returned (nil on error) and puts it back in pool.
func (c *readyConn) ReadOnReady(size int, pool mem.BufferPool) (*[]byte, int, error) {
	c.size, c.pool = size, pool
	err := c.raw.Read(c.doRead)
	buf, n, readErr := c.buf, c.n, c.readErr
	c.pool, c.buf, c.readErr = nil, nil, nil
	switch {
	case err != nil: // closed, or a deadline passed while waiting
		if buf != nil {
			pool.Put(buf)
		}
		return nil, 0, err
	case readErr != nil:
		return nil, 0, readErr
	case n <= 0:
		pool.Put(buf)
		return nil, 0, io.EOF
	}
	return buf, n, nil
}

// read is the raw read: false (not readable after all) makes raw.Read
// wait again. The poller is edge-triggered, so only a real EAGAIN may
// wait.
func (c *readyConn) read(fd uintptr) bool {
	c.buf = c.pool.Get(c.size)
	for {
		c.n, c.readErr = syscall.Read(int(fd), *c.buf)
		if !errors.Is(c.readErr, syscall.EINTR) {
			break
		}
	}
	if c.readErr != nil {
		c.pool.Put(c.buf)
		c.buf = nil
		return c.readErr != syscall.EAGAIN && c.readErr != syscall.EWOULDBLOCK
	}
	return true
}
