package tunnel

// Flow control is pure bookkeeping here; the stream decides when to wait and
// the writer sends the frames (as grpc-go's transport does).

// maxWindow bounds a window so that a hostile peer cannot overflow it.
const maxWindow = 1<<31 - 1

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

// take consumes up to want bytes of credit and returns how many it took.
func (w *sendWindow) take(want int) int {
	n := int(min(int64(want), w.avail))
	if n <= 0 {
		return 0
	}
	w.avail -= int64(n)
	return n
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

// onData accounts for n received bytes and reports false when the peer sent
// more than its credit.
func (w *recvWindow) onData(n int) bool {
	w.avail -= int64(n)
	return w.avail >= 0
}

// onConsumed accounts for n bytes handed to the application and returns the
// increment of the WindowUpdate to send, or 0 to keep batching.
func (w *recvWindow) onConsumed(n int) uint32 {
	w.unacked += int64(n)
	if w.unacked < w.size/windowUpdateDivisor {
		return 0
	}
	inc := w.unacked
	w.avail += inc
	w.unacked = 0
	return uint32(inc)
}
