package tunnel

import (
	"sync"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "github.com/guilhem/operator-plugin-framework/go/gen/pluginframework/v1"
)

// maxControlFrames bounds the queue of tunnel and control frames. Well-behaved
// traffic stays far below it (a few frames per stream); a peer that makes us
// answer garbage while it does not read trips it and loses the tunnel.
const maxControlFrames = 16 << 10

// writer is the one goroutine that calls Transport.Send. Other goroutines
// enqueue frames and never block on the transport. Control frames go first;
// then streams take turns, one frame each, so a large message on one stream
// does not hold back the others. Frames queued together leave in one batch.
type writer struct {
	t  *Tunnel
	tr Transport

	mu       sync.Mutex
	maxBatch int        // the peer's max_batch_size
	ctrl     []outFrame // tunnel frames, window updates, cancels
	pong     *pb.Frame  // at most one pending pong: a ping flood cannot grow the queue
	ready    []*stream  // streams with queued frames, in turn order
	flushing bool       // finish what is queued, then close the tunnel
	paused   bool       // send nothing until resume (Tunnel.Accept)
	wake     chan struct{}
	stopped  chan struct{}
}

func newWriter(t *Tunnel, tr Transport) *writer {
	return &writer{
		t:        t,
		tr:       tr,
		maxBatch: MinMaxBatchSize - batchReserve,
		wake:     make(chan struct{}, 1),
		stopped:  make(chan struct{}),
	}
}

func (w *writer) signal() {
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

func (w *writer) setMaxBatch(n int) {
	w.mu.Lock()
	w.maxBatch = n - batchReserve
	w.mu.Unlock()
}

// control queues a frame ahead of stream data.
func (w *writer) control(f *pb.Frame) {
	w.push(f)
	w.signal()
}

// push queues a control frame without waking the write loop, for a caller
// about to queue more. It never takes t.mu, so callers may hold it.
func (w *writer) push(f *pb.Frame) {
	w.mu.Lock()
	overflow := len(w.ctrl) >= maxControlFrames
	if !overflow {
		w.ctrl = append(w.ctrl, outFrame{f: f})
	}
	w.mu.Unlock()
	if overflow {
		// No room for a GoAway either: close at once.
		go w.t.close(status.New(codes.ResourceExhausted, "tunnel control queue full: the peer is not reading"))
	}
}

func (w *writer) queuePong(nonce uint64) {
	w.mu.Lock()
	w.pong = pongFrame(nonce)
	w.mu.Unlock()
	w.signal()
}

// enqueue appends frames to a stream's ordered queue. Data frames must carry
// credit already taken from the stream's send window, which bounds the queue.
func (w *writer) enqueue(s *stream, frames ...*pb.Frame) {
	out := make([]outFrame, len(frames))
	for i, f := range frames {
		out[i].f = f
	}
	w.enqueueOut(s, out)
}

// enqueueOut is enqueue for frames that may hold buffers. Frames for a
// stream already aborted are dropped: the abort is its last frame.
func (w *writer) enqueueOut(s *stream, frames []outFrame) {
	w.mu.Lock()
	if s.aborted {
		w.mu.Unlock()
		freeOut(frames)
		return
	}
	s.out = append(s.out, frames...)
	if !s.queued {
		s.queued = true
		w.ready = append(w.ready, s)
	}
	w.mu.Unlock()
	w.signal()
}

// discard drops what a stream still has queued and anything it queues
// later; used when it is aborted or its peer closed it.
func (w *writer) discard(s *stream) {
	w.mu.Lock()
	out := s.out
	s.out = nil
	s.aborted = true
	w.mu.Unlock()
	freeOut(out)
}

func freeOut(frames []outFrame) {
	for _, f := range frames {
		if f.buf != nil {
			f.buf.Free()
		}
	}
}

// pause holds every frame back until resume.
func (w *writer) pause() {
	w.mu.Lock()
	w.paused = true
	w.mu.Unlock()
}

func (w *writer) resume() {
	w.mu.Lock()
	w.paused = false
	w.mu.Unlock()
	w.signal()
}

// flush asks the writer to send everything queued and then close the
// tunnel (see closeFlushed).
func (w *writer) flush() {
	w.mu.Lock()
	w.flushing = true
	w.mu.Unlock()
	w.signal()
}

func (w *writer) run() {
	defer close(w.stopped)
	var batch []outFrame
	for {
		select {
		case <-w.wake:
		case <-w.t.done:
			return
		}
		for {
			var flushed bool
			batch, flushed = w.collect(batch[:0])
			if len(batch) == 0 {
				if flushed {
					_ = w.tr.CloseSend()
					w.t.closeFlushed()
					return
				}
				break
			}
			err := w.tr.Send(batch) // the transport now owns the buffers
			clear(batch)
			if err != nil {
				w.t.close(w.t.transportStatus(err))
				return
			}
		}
	}
}

// collect fills batch up to the peer's batch limit and reports whether the
// queues are empty while a flush was asked for.
func (w *writer) collect(batch []outFrame) ([]outFrame, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.paused {
		return batch, false
	}
	size := 0
	n := 0
	for ; n < len(w.ctrl) && len(batch) < maxBatchFrames; n++ {
		fs := frameSize(w.ctrl[n].f)
		if len(batch) > 0 && size+fs > w.maxBatch {
			break
		}
		batch = append(batch, w.ctrl[n])
		size += fs
	}
	w.ctrl = w.ctrl[n:]
	if len(w.ctrl) == 0 {
		w.ctrl = nil // let the backing array go
	}
	if w.pong != nil && len(batch) < maxBatchFrames && (len(batch) == 0 || size+frameOverhead <= w.maxBatch) {
		batch = append(batch, outFrame{f: w.pong})
		size += frameSize(w.pong)
		w.pong = nil
	}
	for len(w.ready) > 0 && len(batch) < maxBatchFrames {
		s := w.ready[0]
		if len(s.out) == 0 { // discarded
			w.ready = w.ready[1:]
			s.queued = false
			continue
		}
		f := s.out[0]
		fs := frameSize(f.f)
		if len(batch) > 0 && size+fs > w.maxBatch {
			break
		}
		batch = append(batch, f)
		size += fs
		s.out[0] = outFrame{}
		s.out = s.out[1:]
		w.ready = w.ready[1:]
		if len(s.out) > 0 {
			w.ready = append(w.ready, s)
		} else {
			s.out = nil
			s.queued = false
		}
	}
	empty := len(w.ctrl) == 0 && len(w.ready) == 0
	return batch, empty && w.flushing
}
