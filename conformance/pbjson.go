package conformance

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/known/anypb"

	// Status details the cases use, for protojson's Any resolution.
	_ "google.golang.org/genproto/googleapis/rpc/errdetails"
)

// Messages are written in the cases as protobuf JSON with snake_case names,
// plus some sugar (docs/conformance.md):
//   - a bytes field X may be given as X_size (that many pattern bytes, the
//     byte i % 256 at offset i) or X_text (the text's bytes);
//   - a google.protobuf.Duration may be given as a Go duration ("300ms");
//   - a status code may be given by name ("ABORTED");
//   - a repeated MetadataEntry field may be given as a map from key to
//     values, text values as they are and "-bin" values in base64;
//   - integer fields may be sizes ("8MiB", "peer.initial_window_size+1");
//   - a StreamMessage may be given as proto: {type, value}, the encoding of
//     a message of that type, and its size defaults to its data's length.
//
// Received messages are turned into the same form to be matched: bytes
// fields get X_size, X_text and X_pattern (whether they hold pattern
// bytes) beside X, durations are Go durations, codes and enums are names,
// metadata lists are maps.

// codeNames are the canonical status code names, by code.
var codeNames = []string{
	"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
	"ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
	"ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
	"UNAUTHENTICATED",
}

// codeByName parses a code name; empty is OK.
func codeByName(name string) (codes.Code, error) {
	if name == "" {
		return codes.OK, nil
	}
	if name == handlerCrash {
		return codes.Internal, nil // resolved per SDK when checked
	}
	if i := slices.Index(codeNames, name); i >= 0 {
		return codes.Code(i), nil
	}
	return 0, fmt.Errorf("unknown status code %q", name)
}

func codeName(c codes.Code) string {
	if int(c) < len(codeNames) {
		return codeNames[c]
	}
	return fmt.Sprintf("CODE(%d)", c)
}

// pattern returns n pattern bytes: the byte i % 256 at offset i.
func pattern(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i)
	}
	return b
}

// letters is a string of n letters, a to z in turn (X_size of a string
// field).
func letters(n int) string {
	b := make([]byte, n)
	for i := range b {
		b[i] = 'a' + byte(i%26)
	}
	return string(b)
}

// padTo sets m's payload (field 1, bytes, pattern bytes) so that m encodes
// to exactly want bytes.
func padTo(m proto.Message, want int) error {
	fd := m.ProtoReflect().Descriptor().Fields().ByNumber(1)
	if fd == nil || fd.Kind() != protoreflect.BytesKind || fd.IsList() {
		return fmt.Errorf("length: %s has no bytes field 1 to pad", m.ProtoReflect().Descriptor().FullName())
	}
	m.ProtoReflect().Clear(fd)
	if n := fitPayload(proto.Size(m), want); n > 0 {
		m.ProtoReflect().Set(fd, protoreflect.ValueOfBytes(pattern(n)))
	}
	if got := proto.Size(m); got != want {
		return fmt.Errorf("length: a %s cannot be exactly %d bytes long (nearest %d)", m.ProtoReflect().Descriptor().Name(), want, got)
	}
	return nil
}

func isPattern(b []byte) bool {
	for i, c := range b {
		if c != byte(i) {
			return false
		}
	}
	return true
}

// resolver turns a size expression into a number; peer settings may be
// referred to ("peer.max_message_size+1").
type resolver func(expr string) (int, error)

func plainSizes(expr string) (int, error) { return parseSize(expr) }

// findType resolves a message type name, short names in conformance.v1.
func findType(name string) (protoreflect.MessageType, error) {
	full := name
	if !strings.Contains(name, ".") {
		full = "conformance.v1." + name
	}
	mt, err := protoregistry.GlobalTypes.FindMessageByName(protoreflect.FullName(full))
	if err != nil {
		return nil, fmt.Errorf("message type %q: %w", name, err)
	}
	return mt, nil
}

// buildMessage makes a message of type mt from case data.
func buildMessage(mt protoreflect.MessageType, v any, res resolver) (proto.Message, error) {
	norm, err := normalize(mt.Descriptor(), v, res)
	if err != nil {
		return nil, err
	}
	j, err := json.Marshal(norm)
	if err != nil {
		return nil, err
	}
	m := mt.New().Interface()
	if err := protojson.Unmarshal(j, m); err != nil {
		return nil, fmt.Errorf("%s: %w", mt.Descriptor().FullName(), err)
	}
	return m, nil
}

func fieldByName(md protoreflect.MessageDescriptor, name string) protoreflect.FieldDescriptor {
	if fd := md.Fields().ByName(protoreflect.Name(name)); fd != nil {
		return fd
	}
	return md.Fields().ByJSONName(name)
}

// normalize rewrites case data for md into plain protobuf JSON.
func normalize(md protoreflect.MessageDescriptor, v any, res resolver) (map[string]any, error) {
	out := map[string]any{}
	if v == nil {
		return out, nil
	}
	in, ok := v.(map[string]any)
	if !ok {
		return nil, fmt.Errorf("%s: want an object, got %T", md.FullName(), v)
	}
	sizeSet := false
	for k, val := range in {
		if md.FullName() == "pluginframework.v1.StreamMessage" && k == "proto" {
			p, ok := val.(map[string]any)
			if !ok {
				return nil, fmt.Errorf("message proto: want {type, value}")
			}
			typ, _ := p["type"].(string)
			mt, err := findType(typ)
			if err != nil {
				return nil, err
			}
			m, err := buildMessage(mt, p["value"], res)
			if err != nil {
				return nil, err
			}
			if l, ok := p["length"]; ok {
				// Pad the payload so that the message is exactly this long.
				want, err := toInt(l, res)
				if err != nil {
					return nil, fmt.Errorf("message proto length: %w", err)
				}
				if err := padTo(m, want); err != nil {
					return nil, err
				}
			}
			b, err := proto.Marshal(m)
			if err != nil {
				return nil, err
			}
			out["data"] = base64.StdEncoding.EncodeToString(b)
			continue
		}
		for _, suffix := range []string{"_size", "_text"} {
			base, found := strings.CutSuffix(k, suffix)
			if !found {
				continue
			}
			fd := fieldByName(md, base)
			if fd != nil && fd.Kind() == protoreflect.StringKind && !fd.IsList() && suffix == "_size" {
				n, err := toInt(val, res)
				if err != nil {
					return nil, fmt.Errorf("%s: %w", k, err)
				}
				out[string(fd.Name())] = letters(n)
				k = ""
				break
			}
			if fd == nil || fd.Kind() != protoreflect.BytesKind || fd.IsList() {
				continue
			}
			var b []byte
			if suffix == "_text" {
				s, ok := val.(string)
				if !ok {
					return nil, fmt.Errorf("%s: want a string", k)
				}
				b = []byte(s)
			} else {
				n, err := toInt(val, res)
				if err != nil {
					return nil, fmt.Errorf("%s: %w", k, err)
				}
				b = pattern(n)
			}
			out[string(fd.Name())] = base64.StdEncoding.EncodeToString(b)
			k = ""
			break
		}
		if k == "" {
			continue
		}
		fd := fieldByName(md, k)
		if fd == nil {
			return nil, fmt.Errorf("%s has no field %q", md.FullName(), k)
		}
		if fd.Name() == "size" {
			sizeSet = true
		}
		nv, err := normalizeField(fd, val, res)
		if err != nil {
			return nil, fmt.Errorf("%s.%s: %w", md.Name(), k, err)
		}
		out[string(fd.Name())] = nv
	}
	if md.FullName() == "pluginframework.v1.StreamMessage" && !sizeSet {
		if d, ok := out["data"].(string); ok {
			b, err := base64.StdEncoding.DecodeString(d)
			if err != nil {
				return nil, fmt.Errorf("message data: %w", err)
			}
			out["size"] = len(b)
		}
	}
	return out, nil
}

func normalizeField(fd protoreflect.FieldDescriptor, v any, res resolver) (any, error) {
	switch {
	case fd.IsMap():
		if fd.MapValue().Kind() != protoreflect.MessageKind {
			return v, nil
		}
		m, ok := v.(map[string]any)
		if !ok {
			return nil, fmt.Errorf("want a map, got %T", v)
		}
		out := map[string]any{}
		for k, e := range m {
			ne, err := normalizeValue(fd.MapValue(), e, res)
			if err != nil {
				return nil, err
			}
			out[k] = ne
		}
		return out, nil
	case fd.IsList():
		if m, ok := v.(map[string]any); ok && fd.Message() != nil && fd.Message().Name() == "MetadataEntry" {
			return metadataList(m)
		}
		l, ok := v.([]any)
		if !ok {
			return nil, fmt.Errorf("want a list, got %T", v)
		}
		out := make([]any, len(l))
		for i, e := range l {
			ne, err := normalizeValue(fd, e, res)
			if err != nil {
				return nil, err
			}
			out[i] = ne
		}
		return out, nil
	}
	return normalizeValue(fd, v, res)
}

// metadataList turns {key: [values]} into MetadataEntry JSON, sorted by key.
func metadataList(m map[string]any) ([]any, error) {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	out := make([]any, 0, len(keys))
	for _, k := range keys {
		vals, ok := m[k].([]any)
		if !ok {
			vals = []any{m[k]}
		}
		enc := make([]any, len(vals))
		for i, v := range vals {
			if m, ok := v.(map[string]any); ok && len(m) == 1 && m["size"] != nil {
				// {size: N}: N letters, for values too large to write.
				n, err := toInt(m["size"], plainSizes)
				if err != nil {
					return nil, fmt.Errorf("metadata %s: %w", k, err)
				}
				v = letters(n)
			}
			s, ok := v.(string)
			if !ok {
				return nil, fmt.Errorf("metadata %s: want string values (or {size: N})", k)
			}
			if strings.HasSuffix(k, "-bin") {
				if _, err := base64.StdEncoding.DecodeString(s); err != nil {
					return nil, fmt.Errorf("metadata %s: a -bin value is base64: %w", k, err)
				}
				enc[i] = s
			} else {
				enc[i] = base64.StdEncoding.EncodeToString([]byte(s))
			}
		}
		out = append(out, map[string]any{"key": k, "values": enc})
	}
	return out, nil
}

func normalizeValue(fd protoreflect.FieldDescriptor, v any, res resolver) (any, error) {
	switch fd.Kind() {
	case protoreflect.MessageKind, protoreflect.GroupKind:
		md := fd.Message()
		switch md.FullName() {
		case "google.protobuf.Duration":
			if s, ok := v.(string); ok {
				d, err := time.ParseDuration(s)
				if err != nil {
					return nil, err
				}
				return strconv.FormatFloat(d.Seconds(), 'f', -1, 64) + "s", nil
			}
			return v, nil
		case "google.protobuf.Any":
			return v, nil
		case "google.rpc.Status":
			m, ok := v.(map[string]any)
			if !ok {
				return nil, fmt.Errorf("status: want an object")
			}
			out := map[string]any{}
			for k, e := range m {
				out[k] = e
			}
			if name, ok := m["code"].(string); ok {
				c, err := codeByName(name)
				if err != nil {
					return nil, err
				}
				out["code"] = int(c)
			}
			return out, nil
		}
		return normalize(md, v, res)
	case protoreflect.Int32Kind, protoreflect.Int64Kind, protoreflect.Uint32Kind, protoreflect.Uint64Kind,
		protoreflect.Sint32Kind, protoreflect.Sint64Kind, protoreflect.Fixed32Kind, protoreflect.Fixed64Kind,
		protoreflect.Sfixed32Kind, protoreflect.Sfixed64Kind:
		if s, ok := v.(string); ok {
			return toInt(s, res)
		}
	}
	return v, nil
}

func toInt(v any, res resolver) (int, error) {
	switch n := v.(type) {
	case int:
		return n, nil
	case float64:
		return int(n), nil
	case string:
		return res(n)
	}
	return 0, fmt.Errorf("want a number or a size, got %T", v)
}

// matchable turns a received message into the form cases match against.
func matchable(m protoreflect.Message) any {
	if !m.IsValid() {
		return nil
	}
	switch m.Descriptor().FullName() {
	case "google.protobuf.Duration":
		secs := m.Get(m.Descriptor().Fields().ByName("seconds")).Int()
		nanos := m.Get(m.Descriptor().Fields().ByName("nanos")).Int()
		return (time.Duration(secs)*time.Second + time.Duration(nanos)).String()
	case "google.protobuf.Any":
		return anyJSON(m.Interface())
	}
	obj := map[string]any{}
	fields := m.Descriptor().Fields()
	for i := range fields.Len() {
		fd := fields.Get(i)
		if fd.ContainingOneof() != nil && !fd.ContainingOneof().IsSynthetic() && !m.Has(fd) {
			continue
		}
		name := string(fd.Name())
		v := m.Get(fd)
		switch {
		case fd.IsMap():
			out := map[string]any{}
			v.Map().Range(func(k protoreflect.MapKey, e protoreflect.Value) bool {
				out[k.String()] = scalarOrMessage(fd.MapValue(), e)
				return true
			})
			obj[name] = out
		case fd.IsList():
			l := v.List()
			if fd.Message() != nil && fd.Message().Name() == "MetadataEntry" {
				obj[name] = metadataMap(l)
				continue
			}
			out := make([]any, l.Len())
			for j := range l.Len() {
				out[j] = scalarOrMessage(fd, l.Get(j))
			}
			obj[name] = out
		case fd.Kind() == protoreflect.MessageKind:
			if m.Has(fd) {
				obj[name] = matchable(v.Message())
			} else {
				obj[name] = nil
			}
		case fd.Kind() == protoreflect.BytesKind:
			b := v.Bytes()
			obj[name] = base64.StdEncoding.EncodeToString(b)
			obj[name+"_size"] = int64(len(b))
			obj[name+"_pattern"] = isPattern(b)
			if utf8.Valid(b) {
				obj[name+"_text"] = string(b)
			}
		default:
			if m.Descriptor().FullName() == "google.rpc.Status" && name == "code" {
				obj[name] = codeName(codes.Code(v.Int()))
				continue
			}
			obj[name] = scalarOrMessage(fd, v)
		}
	}
	return obj
}

func scalarOrMessage(fd protoreflect.FieldDescriptor, v protoreflect.Value) any {
	switch fd.Kind() {
	case protoreflect.MessageKind, protoreflect.GroupKind:
		return matchable(v.Message())
	case protoreflect.EnumKind:
		if ev := fd.Enum().Values().ByNumber(v.Enum()); ev != nil {
			return string(ev.Name())
		}
		return int64(v.Enum())
	case protoreflect.BoolKind:
		return v.Bool()
	case protoreflect.StringKind:
		return v.String()
	case protoreflect.BytesKind:
		return base64.StdEncoding.EncodeToString(v.Bytes())
	case protoreflect.FloatKind, protoreflect.DoubleKind:
		return v.Float()
	case protoreflect.Uint32Kind, protoreflect.Uint64Kind, protoreflect.Fixed32Kind, protoreflect.Fixed64Kind:
		u := v.Uint()
		if u > math.MaxInt64 {
			return float64(u)
		}
		return int64(u)
	default:
		return v.Int()
	}
}

// metadataMap turns a list of MetadataEntry into {key: [values]}, text
// values as text and "-bin" values in base64.
func metadataMap(l protoreflect.List) map[string]any {
	out := map[string]any{}
	for i := range l.Len() {
		e := l.Get(i).Message()
		key := e.Get(e.Descriptor().Fields().ByName("key")).String()
		vals := e.Get(e.Descriptor().Fields().ByName("values")).List()
		list, _ := out[key].([]any)
		for j := range vals.Len() {
			list = append(list, metadataValue(key, vals.Get(j).Bytes()))
		}
		out[key] = list
	}
	return out
}

func metadataValue(key string, v []byte) string {
	if strings.HasSuffix(key, "-bin") {
		return base64.StdEncoding.EncodeToString(v)
	}
	return string(v)
}

func anyJSON(m proto.Message) any {
	a, ok := m.(*anypb.Any)
	if !ok {
		return nil
	}
	j, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(a)
	if err != nil {
		return map[string]any{"@type": a.GetTypeUrl(), "error": err.Error()}
	}
	var out any
	if err := json.Unmarshal(j, &out); err != nil {
		return nil
	}
	return out
}
