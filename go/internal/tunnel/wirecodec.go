package tunnel

import (
	"errors"
	"fmt"

	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	pb "github.com/guilhem/operator-plugin-framework/go/gen/pluginframework/v1"
)

// WireCodec is the gRPC codec of the Connect stream. Its encoding is plain
// protobuf, byte for byte what proto.Marshal accepts, so peers that use
// ordinary generated code interoperate. It only avoids copies of message
// data: on the way out, chunk data is handed to gRPC by reference instead
// of being copied into the encoded batch; on the way in, the batch is
// copied once and chunk data aliases that copy instead of being copied
// again. For large messages this halves the memory traffic of the tunnel.
var WireCodec encoding.CodecV2 = wireCodec{}

type wireCodec struct{}

// Name keeps the content-type application/grpc+proto: the encoding is proto.
func (wireCodec) Name() string { return "proto" }

// referenceThreshold: chunks smaller than this are copied into the batch,
// where a separate buffer would cost more than the copy.
const referenceThreshold = 4 << 10

// Field numbers of the messages the codec reads and writes by hand; the
// wire codec tests check them against the generated descriptors.
const (
	fieldBatchFrames   = 1  // ConnectRequest.frames, ConnectResponse.frames
	fieldFrameStreamID = 1  // Frame.stream_id
	fieldFrameMessage  = 12 // Frame.message
	fieldMessageSize   = 1  // StreamMessage.size
	fieldMessageData   = 2  // StreamMessage.data
)

func (c wireCodec) Marshal(v any) (mem.BufferSlice, error) {
	switch m := v.(type) {
	case *outBatch:
		m.encoded = true
		return encodeBatch(m.frames)
	case *pb.ConnectRequest:
		return encodeBatch(plainFrames(m.GetFrames()))
	case *pb.ConnectResponse:
		return encodeBatch(plainFrames(m.GetFrames()))
	}
	return encoding.GetCodecV2("proto").Marshal(v)
}

func plainFrames(fs []*pb.Frame) []outFrame {
	out := make([]outFrame, len(fs))
	for i, f := range fs {
		out[i].f = f
	}
	return out
}

// encodeBatch encodes frames as the repeated field 1 of a batch message.
// Large message data is not copied: it is appended to the result as its own
// buffer, whose reference passes to gRPC. It takes over the frames'
// references (buffers.go): on error it frees them all.
func encodeBatch(frames []outFrame) (_ mem.BufferSlice, err error) {
	var out mem.BufferSlice
	var buf []byte
	done := 0 // frames whose reference was freed or moved to out
	defer func() {
		if err != nil {
			out.Free()
			freeOut(frames[done:])
		}
	}()
	for _, of := range frames {
		f := of.f
		msg, ok := f.GetKind().(*pb.Frame_Message)
		if !ok || len(msg.Message.GetData()) < referenceThreshold {
			buf = protowire.AppendTag(buf, fieldBatchFrames, protowire.BytesType)
			buf = protowire.AppendVarint(buf, uint64(proto.Size(f)))
			var err error
			if buf, err = (proto.MarshalOptions{UseCachedSize: true}).MarshalAppend(buf, f); err != nil {
				return nil, err
			}
			freeBuffer(of.buf) // copied
			done++
			continue
		}
		// Frame{stream_id, message: StreamMessage{size, data}}.
		data := msg.Message.GetData()
		size := uint64(msg.Message.GetSize())
		smLen := protowire.SizeTag(fieldMessageData) + protowire.SizeBytes(len(data))
		if size != 0 {
			smLen += protowire.SizeTag(fieldMessageSize) + protowire.SizeVarint(size)
		}
		id := f.GetStreamId()
		frameLen := protowire.SizeTag(fieldFrameMessage) + protowire.SizeBytes(smLen)
		if id != 0 {
			frameLen += protowire.SizeTag(fieldFrameStreamID) + protowire.SizeVarint(id)
		}
		buf = protowire.AppendTag(buf, fieldBatchFrames, protowire.BytesType)
		buf = protowire.AppendVarint(buf, uint64(frameLen))
		if id != 0 {
			buf = protowire.AppendTag(buf, fieldFrameStreamID, protowire.VarintType)
			buf = protowire.AppendVarint(buf, id)
		}
		buf = protowire.AppendTag(buf, fieldFrameMessage, protowire.BytesType)
		buf = protowire.AppendVarint(buf, uint64(smLen))
		if size != 0 {
			buf = protowire.AppendTag(buf, fieldMessageSize, protowire.VarintType)
			buf = protowire.AppendVarint(buf, size)
		}
		buf = protowire.AppendTag(buf, fieldMessageData, protowire.BytesType)
		buf = protowire.AppendVarint(buf, uint64(len(data)))
		out = append(out, mem.SliceBuffer(buf))
		buf = nil
		if of.buf != nil {
			out = append(out, of.buf)
		} else {
			out = append(out, mem.SliceBuffer(data))
		}
		done++
	}
	if len(buf) > 0 || len(out) == 0 {
		out = append(out, mem.SliceBuffer(buf))
	}
	return out, nil
}

func (c wireCodec) Unmarshal(data mem.BufferSlice, v any) error {
	switch m := v.(type) {
	case *inBatch:
		if limit := m.limit(); limit > 0 && data.Len() > limit {
			// Refused undecoded: a batch-level violation, not a codec error.
			m.tooLarge = data.Len()
			return nil
		}
		root := data.MaterializeToBuffer(BufferPool)
		defer root.Free()
		fs, err := decodeBatch(root.ReadOnlyData(), root)
		m.frames = fs
		if errors.Is(err, errTooManyFrames) {
			m.tooMany = true
			return nil
		}
		return err
	case *pb.ConnectRequest:
		return decodePlain(data, &m.Frames)
	case *pb.ConnectResponse:
		return decodePlain(data, &m.Frames)
	}
	return encoding.GetCodecV2("proto").Unmarshal(data, v)
}

func decodePlain(data mem.BufferSlice, dst *[]*pb.Frame) error {
	fs, err := decodeBatch(data.Materialize(), nil)
	for _, f := range fs {
		*dst = append(*dst, f.f)
	}
	return err
}

// maxBatchFrames is the most frames a batch may hold (spec 3.1).
const maxBatchFrames = 4096

var errTooManyFrames = errors.New("batch of more than 4096 frames")

// decodeBatch parses an encoded ConnectRequest or ConnectResponse in b.
// Message frames are parsed by hand so that their data aliases b; every
// other frame goes through proto.Unmarshal. Unknown fields are skipped, as
// proto does. When root (the buffer holding b) is set, each chunk gets a
// buffer of its own, a counted view of root or a copy (buffers.go), since
// root is freed when decoding ends. More than maxBatchFrames frames is
// errTooManyFrames. On any error the buffers decoded so far are freed.
func decodeBatch(b []byte, root mem.Buffer) (frames []inFrame, err error) {
	whole := b
	defer func() {
		if err != nil {
			for _, f := range frames {
				freeBuffer(f.buf)
			}
			frames = nil
		}
	}()
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return frames, fmt.Errorf("malformed batch: %w", protowire.ParseError(n))
		}
		if num > protowire.MaxValidNumber {
			return frames, fmt.Errorf("malformed batch: field number %d out of range", num)
		}
		b = b[n:]
		if num != fieldBatchFrames || typ != protowire.BytesType {
			if n = protowire.ConsumeFieldValue(num, typ, b); n < 0 {
				return frames, fmt.Errorf("malformed batch: %w", protowire.ParseError(n))
			}
			b = b[n:]
			continue
		}
		fb, n := protowire.ConsumeBytes(b)
		if n < 0 {
			return frames, fmt.Errorf("malformed batch: %w", protowire.ParseError(n))
		}
		b = b[n:]
		if len(frames) == maxBatchFrames {
			return frames, errTooManyFrames
		}
		f, aliased, err := decodeFrame(fb)
		if err != nil {
			return frames, err
		}
		in := inFrame{f: f}
		if m := f.GetMessage(); root != nil && aliased && len(m.Data) > 0 {
			if aliasable(len(m.Data), len(whole)) {
				off := cap(whole) - cap(m.Data)
				in.buf = root.Slice(off, off+len(m.Data))
			} else {
				in.buf = mem.Copy(m.Data, BufferPool)
				m.Data = in.buf.ReadOnlyData()
			}
		}
		frames = append(frames, in)
	}
	return frames, nil
}

// decodeFrame parses one Frame, by hand when it is a message frame whose
// only fields are the ones the fast path knows.
// aliased reports that a message frame's data is a slice of b.
func decodeFrame(b []byte) (f *pb.Frame, aliased bool, err error) {
	if f, ok := decodeMessageFrame(b); ok {
		return f, true, nil
	}
	f = &pb.Frame{}
	if err := proto.Unmarshal(b, f); err != nil {
		return nil, false, fmt.Errorf("malformed frame: %w", err)
	}
	return f, false, nil
}

// decodeMessageFrame is the fast path of decodeFrame. It reports false for
// anything unusual (another kind, repeated or unknown fields), which then
// takes the general path.
func decodeMessageFrame(b []byte) (*pb.Frame, bool) {
	var id uint64
	var msg *pb.StreamMessage
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return nil, false
		}
		b = b[n:]
		switch {
		case num == fieldFrameStreamID && typ == protowire.VarintType:
			id, n = protowire.ConsumeVarint(b)
		case num == fieldFrameMessage && typ == protowire.BytesType && msg == nil:
			var mb []byte
			mb, n = protowire.ConsumeBytes(b)
			if n >= 0 {
				if msg = decodeStreamMessage(mb); msg == nil {
					return nil, false
				}
			}
		default:
			return nil, false
		}
		if n < 0 {
			return nil, false
		}
		b = b[n:]
	}
	if msg == nil {
		return nil, false
	}
	return &pb.Frame{StreamId: id, Kind: &pb.Frame_Message{Message: msg}}, true
}

func decodeStreamMessage(b []byte) *pb.StreamMessage {
	m := &pb.StreamMessage{}
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return nil
		}
		b = b[n:]
		switch {
		case num == fieldMessageSize && typ == protowire.VarintType:
			var v uint64
			v, n = protowire.ConsumeVarint(b)
			m.Size = uint32(v)
		case num == fieldMessageData && typ == protowire.BytesType:
			m.Data, n = protowire.ConsumeBytes(b)
		default:
			return nil
		}
		if n < 0 {
			return nil
		}
		b = b[n:]
	}
	return m
}
