package tunnel

// Flow control is pure bookkeeping here; the stream decides when to wait and
// the writer sends the frames (as grpc-go's transport does).

// maxWindow bounds a window so that a hostile peer cannot overflow it.
const maxWindow = 1<<31 - 1

// chunkCost is the credit every StreamMessage costs besides its data
// (spec 8.1): it stands for the receiver's bookkeeping of a buffered chunk,
// so that a window bounds memory even when messages are empty.
const chunkCost = 64

// minWindow is the smallest initial window a side may advertise: room for
// a chunk cost and some data.
const minWindow = 1 << 10

// sendWindow is the credit the peer granted us on one stream. Guarded by the
// owning stream's mutex.
type sendWindow struct {
	avail int64
}

// grant adds credit from a WindowUpdate and reports false when the peer
// pushed the window past its maximum (a protocol violation).
func (w *sendWindow) grant(n uint32) bool {
	w.avail += int64(n)
	return w.avail <= maxWindow
}

// take consumes the credit of one chunk carrying up to want bytes of data
// and returns how many bytes the chunk may carry, or false when the credit
// does not cover a chunk: an empty one needs chunkCost, a non-empty one
// more.
func (w *sendWindow) take(want int) (int, bool) {
	room := w.avail - chunkCost
	if room < 0 || (want > 0 && room == 0) {
		return 0, false
	}
	n := int(min(int64(want), room))
	w.avail -= int64(n) + chunkCost
	return n, true
}

// recvWindow tracks the credit we granted the peer on one stream. Guarded by
// the owning stream's mutex.
type recvWindow struct {
	size    int64 // the initial window; updates are batched at size/windowUpdateDivisor
	avail   int64 // credit the peer has left
	unacked int64 // consumed by the application, not yet returned
}

func newRecvWindow(size int) recvWindow {
	return recvWindow{size: int64(size), avail: int64(size)}
}

// onChunk accounts for a received chunk of n data bytes and reports false
// when the peer sent more than its credit.
func (w *recvWindow) onChunk(n int) bool {
	w.avail -= int64(n) + chunkCost
	return w.avail >= 0
}

// onConsumed accounts for chunks carrying n data bytes in all, handed to
// the application, and returns the increment of the WindowUpdate to send,
// or 0 to keep batching.
func (w *recvWindow) onConsumed(chunks, n int) uint32 {
	w.unacked += int64(n) + int64(chunks)*chunkCost
	if w.unacked < w.size/windowUpdateDivisor {
		return 0
	}
	inc := w.unacked
	w.avail += inc
	w.unacked = 0
	return uint32(inc)
}
