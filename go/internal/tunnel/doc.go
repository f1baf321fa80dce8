// Package tunnel is the one implementation of the tunnel protocol
// (docs/tunnel-spec.md) that both the operator's and the plugin's sides use.
//
// A Tunnel multiplexes calls over one Connect stream (a Transport). Its
// parts, one file each:
//
//   - defaults.go, settings.go: limits, their defaults and negotiation;
//   - frame.go, wirecodec.go: frame construction, metadata and status
//     mapping, and the Connect stream's codec (plain protobuf that avoids
//     copying message data);
//   - writer.go: the only goroutine that sends; control frames first, then
//     streams in turn, batched;
//   - stream.go, flow.go: the per-call state machine, chunked messages and
//     credit-based flow control;
//   - tunnel.go: handshake, the read loop that routes frames and never
//     blocks, go-away and drain;
//   - heartbeat.go: pings and silence detection;
//   - channel.go: the caller's side, a grpc.ClientConnInterface;
//   - dispatch.go, server_stream.go: the handler's side, serving
//     grpc.ServiceDescs.
package tunnel
