package server

import (
	"context"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// The Connect handler reads its own tunnel: gRPC has started a goroutine
// for it that would otherwise only wait, and a read loop of its own would
// cost each idle tunnel one goroutine (and its stack) more. But gRPC ends
// a server stream only when its handler returns, which a handler blocked
// in Recv cannot do. What gRPC does itself when a read fails ends it too:
// the stream's WriteStatus sends the trailers and cancels the stream, so
// that Recv returns. streamEnder finds it.

// statusWriter is what gRPC's server stream (the ServerTransportStream
// in a handler's context) offers to end it.
type statusWriter interface {
	WriteStatus(*status.Status) error
}

// streamEnder returns what ends the stream whose handler has ctx, with a
// tunnel's closing status (OK: the handler's nil), or nil when gRPC does
// not offer it; the tunnel then reads in a goroutine of its own.
func streamEnder(ctx context.Context) func(*status.Status) {
	w, ok := grpc.ServerTransportStreamFromContext(ctx).(statusWriter)
	if !ok {
		return nil
	}
	return func(st *status.Status) {
		if st.Code() == codes.OK {
			st = status.New(codes.OK, "") // what returning nil sends
		}
		_ = w.WriteStatus(st)
	}
}
