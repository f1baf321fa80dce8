package tunnel

import (
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"
)

// codec (de)serializes call messages with one of gRPC's registered codecs,
// proto unless a call option says otherwise.
type codec struct {
	v2 encoding.CodecV2
	v1 encoding.Codec // set by grpc.ForceCodec
}

func defaultCodec() codec { return codec{v2: encoding.GetCodecV2(proto.Name)} }

func (c codec) name() string {
	if c.v1 != nil {
		return c.v1.Name()
	}
	return c.v2.Name()
}

// marshal returns the encoded message and, when it lives in a pooled
// buffer, that buffer: its reference passes to the caller.
func (c codec) marshal(v any) ([]byte, mem.Buffer, error) {
	if c.v1 != nil {
		b, err := c.v1.Marshal(v)
		if err != nil {
			return nil, nil, status.Errorf(codes.Internal, "grpc: error while marshaling: %v", err)
		}
		return b, nil, nil
	}
	bs, err := c.v2.Marshal(v)
	if err != nil {
		return nil, nil, status.Errorf(codes.Internal, "grpc: error while marshaling: %v", err)
	}
	if len(bs) == 1 {
		return bs[0].ReadOnlyData(), bs[0], nil
	}
	b := bs.Materialize()
	bs.Free()
	return b, nil, nil
}

func (c codec) unmarshal(data []byte, v any) error {
	var err error
	if c.v1 != nil {
		err = c.v1.Unmarshal(data, v)
	} else {
		err = c.v2.Unmarshal(mem.BufferSlice{mem.SliceBuffer(data)}, v)
	}
	if err != nil {
		return status.Errorf(codes.Internal, "grpc: failed to unmarshal the received message: %v", err)
	}
	return nil
}
