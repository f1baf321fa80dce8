package tunnel

import (
	"fmt"
	"strings"
	"unicode/utf8"

	spb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/guilhem/operator-plugin-framework/go/gen/pluginframework/v1"
)

// Frame constructors. The oneof wrapper types make each frame three small
// allocations; these keep call sites short.

func helloFrame(s Settings) *pb.Frame {
	return &pb.Frame{Kind: &pb.Frame_Hello{Hello: &pb.Hello{
		MinVersion: MinVersion, MaxVersion: MaxVersion, Settings: s.proto(),
	}}}
}

func pingFrame(nonce uint64) *pb.Frame {
	return &pb.Frame{Kind: &pb.Frame_Ping{Ping: &pb.Ping{Nonce: nonce}}}
}

func pongFrame(nonce uint64) *pb.Frame {
	return &pb.Frame{Kind: &pb.Frame_Pong{Pong: &pb.Pong{Nonce: nonce}}}
}

// goAwayFrame says that this side takes no stream above lastPeerID, the
// highest id the peer opened that this side had received (spec 12.1).
func goAwayFrame(reason *status.Status, lastPeerID uint64) *pb.Frame {
	return &pb.Frame{Kind: &pb.Frame_GoAway{GoAway: &pb.GoAway{Reason: reason.Proto(), LastStreamId: &lastPeerID}}}
}

func openFrame(id uint64, method string, md metadata.MD, timeout *durationpb.Duration) *pb.Frame {
	return &pb.Frame{StreamId: id, Kind: &pb.Frame_Open{Open: &pb.StreamOpen{
		Method: method, Metadata: encodeMetadata(md), Timeout: timeout,
	}}}
}

func headersFrame(id uint64, md metadata.MD) *pb.Frame {
	return &pb.Frame{StreamId: id, Kind: &pb.Frame_Headers{Headers: &pb.StreamHeaders{Metadata: encodeMetadata(md)}}}
}

func messageFrame(id uint64, size uint32, data []byte) *pb.Frame {
	return &pb.Frame{StreamId: id, Kind: &pb.Frame_Message{Message: &pb.StreamMessage{Size: size, Data: data}}}
}

func halfCloseFrame(id uint64) *pb.Frame {
	return &pb.Frame{StreamId: id, Kind: &pb.Frame_HalfClose{HalfClose: &pb.StreamHalfClose{}}}
}

func cancelFrame(id uint64, st *status.Status) *pb.Frame {
	return &pb.Frame{StreamId: id, Kind: &pb.Frame_Cancel{Cancel: &pb.StreamCancel{Status: st.Proto()}}}
}

func closeFrame(id uint64, st *status.Status, trailers metadata.MD) *pb.Frame {
	return &pb.Frame{StreamId: id, Kind: &pb.Frame_Close{Close: &pb.StreamClose{
		Status: st.Proto(), Trailers: encodeMetadata(trailers),
	}}}
}

func windowUpdateFrame(id uint64, inc uint32) *pb.Frame {
	return &pb.Frame{StreamId: id, Kind: &pb.Frame_WindowUpdate{WindowUpdate: &pb.WindowUpdate{Increment: inc}}}
}

// frameSize bounds a frame's encoded size for batching: exact for frames
// without data, which can carry large metadata.
func frameSize(f *pb.Frame) int {
	if m, ok := f.Kind.(*pb.Frame_Message); ok {
		return len(m.Message.Data) + frameOverhead
	}
	return proto.Size(f) + frameOverhead
}

// kindName names a frame's kind as the protocol does ("hello", "open", ...).
func kindName(f *pb.Frame) string {
	fd := f.ProtoReflect().WhichOneof(f.ProtoReflect().Descriptor().Oneofs().ByName("kind"))
	if fd == nil {
		return "unknown"
	}
	return string(fd.Name())
}

// fitStatus cuts st so that a frame carrying it fits in limit bytes: its
// details go first, then the end of its message (at a rune boundary).
func fitStatus(st *status.Status, limit int) *status.Status {
	p := st.Proto()
	if proto.Size(p)+frameOverhead <= limit {
		return st
	}
	p.Details = nil
	if over := proto.Size(p) + frameOverhead - limit; over > 0 {
		msg := p.Message[:max(len(p.Message)-over-len("…"), 0)]
		for len(msg) > 0 && !utf8.ValidString(msg) {
			msg = msg[:len(msg)-1]
		}
		p.Message = msg + "…"
	}
	return status.FromProto(p)
}

// statusFromProto turns a received status into a *status.Status. An unset
// status means def; codes outside the gRPC range become UNKNOWN, as gRPC
// itself treats them.
func statusFromProto(p *spb.Status, def codes.Code) *status.Status {
	if p == nil {
		return status.New(def, "")
	}
	if p.Code < 0 || p.Code > int32(codes.Unauthenticated) {
		p = &spb.Status{Code: int32(codes.Unknown), Message: p.Message, Details: p.Details}
	}
	return status.FromProto(p)
}

// reservedKey reports metadata keys that belong to the transport and are
// never carried in the tunnel, as grpc-go drops them from user metadata.
func reservedKey(k string) bool {
	if strings.HasPrefix(k, ":") {
		return true
	}
	if strings.HasPrefix(k, "grpc-") {
		return k != "grpc-trace-bin"
	}
	switch k {
	case "content-type", "te", "user-agent", "connection":
		return true
	}
	return false
}

func encodeMetadata(md metadata.MD) []*pb.MetadataEntry {
	if len(md) == 0 {
		return nil
	}
	out := make([]*pb.MetadataEntry, 0, len(md))
	for k, vs := range md {
		k = strings.ToLower(k)
		if reservedKey(k) || len(vs) == 0 {
			continue
		}
		e := &pb.MetadataEntry{Key: k, Values: make([][]byte, len(vs))}
		for i, v := range vs {
			e.Values[i] = []byte(v)
		}
		out = append(out, e)
	}
	return out
}

// checkMetadata validates metadata about to be sent with the rules
// decodeMetadata applies on receipt, so that a bad key fails the call here
// rather than at the peer.
func checkMetadata(md metadata.MD) error {
	for k, vs := range md {
		k = strings.ToLower(k)
		if reservedKey(k) {
			continue
		}
		if !validKey(k) || strings.HasPrefix(k, ":") {
			return status.Errorf(codes.Internal, "header key %q contains illegal characters", k)
		}
		if strings.HasSuffix(k, "-bin") {
			continue
		}
		for _, v := range vs {
			if !printable([]byte(v)) {
				return status.Errorf(codes.Internal, "header key %q contains value with non-printable ASCII characters", k)
			}
		}
	}
	return nil
}

// decodeMetadata validates received metadata as gRPC would on the wire:
// keys are lower-case [0-9a-z-_.], values of non "-bin" keys are printable
// ASCII. Reserved keys are dropped.
func decodeMetadata(entries []*pb.MetadataEntry) (metadata.MD, error) {
	md := make(metadata.MD, len(entries))
	for _, e := range entries {
		if !validKey(e.Key) {
			return nil, fmt.Errorf("invalid metadata key %q", e.Key)
		}
		if reservedKey(e.Key) {
			continue
		}
		binary := strings.HasSuffix(e.Key, "-bin")
		for _, v := range e.Values {
			if !binary && !printable(v) {
				return nil, fmt.Errorf("metadata key %q has a non-printable value", e.Key)
			}
			md[e.Key] = append(md[e.Key], string(v))
		}
	}
	return md, nil
}

func validKey(k string) bool {
	if k == "" {
		return false
	}
	for i := 0; i < len(k); i++ {
		c := k[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.' || (i == 0 && c == ':')) {
			return false
		}
	}
	return true
}

func printable(v []byte) bool {
	for _, c := range v {
		if c < 0x20 || c > 0x7e {
			return false
		}
	}
	return true
}

// validMethod checks the "/service/method" form.
func validMethod(m string) bool {
	if len(m) < 4 || m[0] != '/' {
		return false
	}
	i := strings.LastIndexByte(m, '/')
	return i > 1 && i < len(m)-1
}

// splitMethod returns service and method of a valid "/service/method".
func splitMethod(m string) (string, string) {
	i := strings.LastIndexByte(m, '/')
	return m[1:i], m[i+1:]
}
