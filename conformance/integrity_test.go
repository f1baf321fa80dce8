package conformance

import (
	"encoding/base64"
	"testing"

	"google.golang.org/protobuf/proto"

	conformancev1 "github.com/guilhem/operator-plugin-framework/go/gen/conformance/v1"
)

// The runner's payload generator against bytes computed apart from it
// (Python's hashlib; cases/observation.yaml uses the same ones).
func TestGenPayloadVectors(t *testing.T) {
	for _, v := range []struct {
		seed uint64
		k    uint32
		n    int
		want string
	}{
		{7, 0, 40, "6N2UPTZsque+twbGrmaO/wolf8Vu3CfXsvocMb3y7sFP8ZC0wsVz7A=="},
		{7, 1, 5, "2k2vRg8="},
	} {
		if got := base64.StdEncoding.EncodeToString(genPayload(v.seed, v.k, v.n)); got != v.want {
			t.Errorf("genPayload(%d, %d, %d) = %s, want %s", v.seed, v.k, v.n, got, v.want)
		}
	}
	if p := genPayload(0, 3, 300); p[0] != 0 || p[255] != 255 || p[256] != 0 || p[299] != 43 {
		t.Errorf("seed 0 is not the i %% 256 pattern: %v", p[250:])
	}
	if got := base64.StdEncoding.EncodeToString(requestDigest([][]byte{[]byte("abc")})); got != "0EtyplDOD4zkljMwpT7igycz0rrv//PB2OJWzKCW0SA=" {
		t.Errorf("requestDigest(abc) = %s", got)
	}
}

// fitPayload reaches every length it can, and the nearest below otherwise,
// across the varint boundaries of 1, 2 and 3 bytes.
func TestFitPayload(t *testing.T) {
	for _, key := range []int{-1, 0, 3, 36} {
		m := &conformancev1.UnaryRequest{}
		if key >= 0 {
			m.Action = &conformancev1.Action{RecordKey: string(make([]byte, key))}
		}
		base := proto.Size(m)
		// The lengths a payload of 0 to 20,000 bytes gives.
		reachable := map[int]bool{base: true}
		for p := 1; p < 20000; p++ {
			reachable[base+1+protowireSize(p)+p] = true
		}
		for want := base; want < 19000; want++ {
			m.Payload = make([]byte, fitPayload(base, want))
			got := proto.Size(m)
			if got > want || (got < want && reachable[want]) || (got != want && !reachable[want] && reachable[got+1] && got+1 <= want) {
				t.Fatalf("base %d, want %d: got %d", base, want, got)
			}
		}
		for _, want := range []int{2<<20 - 1, 2 << 20, 2<<20 + 1, 2<<20 + 3, 3 << 20} {
			m.Payload = make([]byte, fitPayload(base, want))
			if got := proto.Size(m); got > want || want-got > 1 {
				t.Errorf("base %d, want %d: got %d", base, want, got)
			}
		}
	}
}

func protowireSize(p int) int {
	n := 1
	for ; p >= 0x80; p >>= 7 {
		n++
	}
	return n
}
