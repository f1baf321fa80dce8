package tunnel

import (
	"sync"
	"time"

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
	maxBatch int           // the peer's max_batch_size
	ctrl     []outFrame    // tunnel frames, window updates, cancels
	pong     *pb.Frame     // at most one pending pong: a ping flood cannot grow the queue
	ready    []*stream     // streams with queued frames, in turn order
	flushing bool          // finish what is queued, then close the tunnel
	paused   bool          // send nothing until resume (Tunnel.Accept)
	running  bool          // a write loop is running (there is at most one)
	ended    bool          // the tunnel is closed or flushed: no write loop starts again
	exited   chan struct{} // closed when the running write loop returns; made by wait
	batch    []outFrame    // the write loop's batch, kept between runs
	wake     chan struct{} // tells a lingering write loop that frames are queued
}

// writerLinger is how long a write loop with nothing to send waits for more
// before it returns. Starting a goroutine per call cost a sequential unary
// call about 6 µs (p50 29 to 35 µs on 2 cores); a loop that waits a moment
// keeps busy tunnels at the cost of a channel wake-up, while an idle one
// (a heartbeat every few seconds) still holds no goroutine.
const writerLinger = 20 * time.Millisecond

func newWriter(t *Tunnel, tr Transport) *writer {
	return &writer{
		t:        t,
		tr:       tr,
		maxBatch: MinMaxBatchSize - batchReserve,
		wake:     make(chan struct{}, 1),
	}
}

// signal makes sure a write loop runs to send what is queued.
//
// Cost: the write loop is a goroutine only while there is something to
// send; it returns once the queues have stayed empty for writerLinger, and
// the next frame starts it again. An idle tunnel (thousands of them on one
// operator) then holds no goroutine, nor its stack, for writing.
func (w *writer) signal() {
	w.mu.Lock()
	if w.running {
		w.mu.Unlock()
		select {
		case w.wake <- struct{}{}:
		default: // a wake-up is pending already
		}
		return
	}
	start := !w.ended
	if start {
		select {
		case <-w.t.done:
			w.ended = true
			start = false
		default:
			w.running = true
		}
	}
	w.mu.Unlock()
	if start {
		go w.run()
	}
}

// wait stops write loops from starting again and waits until the running
// one, if any, has returned or timeout has passed. Called once the tunnel
// is closed.
func (w *writer) wait(timeout time.Duration) {
	w.mu.Lock()
	w.ended = true
	if !w.running {
		w.mu.Unlock()
		return
	}
	if w.exited == nil {
		w.exited = make(chan struct{})
	}
	exited := w.exited
	w.mu.Unlock()
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case <-exited:
	case <-timer.C:
	}
}

// exitLocked marks the write loop stopped; end: for good.
func (w *writer) exitLocked(end bool) {
	w.running = false
	w.ended = w.ended || end
	if w.exited != nil {
		close(w.exited)
		w.exited = nil
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

// run sends batches until the queues have stayed empty for writerLinger
// (then it returns: signal starts it again), the tunnel closes, or a flush
// is done.
func (w *writer) run() {
	batch := w.batch
	var idle *time.Timer // made at the first wait, reset at the next ones
	defer func() {
		if idle != nil {
			idle.Stop()
		}
	}()
	for {
		select {
		case <-w.t.done:
			w.end()
			return
		default:
		}
		var flushed, empty bool
		batch, flushed, empty = w.collect(batch[:0])
		if empty {
			if idle == nil {
				idle = time.NewTimer(writerLinger)
			} else {
				idle.Reset(writerLinger)
			}
			if w.linger(idle, batch) {
				continue
			}
			// linger has marked the loop stopped under the lock that
			// guards the queues: a frame queued from now on starts another.
			return
		}
		if len(batch) == 0 && flushed {
			_ = w.tr.CloseSend()
			w.t.closeFlushed()
			w.end()
			return
		}
		err := w.tr.Send(batch) // the transport now owns the buffers
		clear(batch)
		if err != nil {
			w.t.close(w.t.transportStatus(err))
			w.end()
			return
		}
	}
}

// end stops the write loop for good.
func (w *writer) end() {
	w.mu.Lock()
	w.batch = nil
	w.exitLocked(true)
	w.mu.Unlock()
}

// collect fills batch up to the peer's batch limit and reports whether the
// queues are empty while a flush was asked for, or that there is nothing to
// send (empty: the write loop lingers).
func (w *writer) collect(batch []outFrame) (_ []outFrame, flushed, empty bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.paused {
		return batch, false, true // linger stops the loop
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
	drained := len(w.ctrl) == 0 && len(w.ready) == 0
	if len(batch) == 0 && !(drained && w.flushing) {
		return batch, false, true
	}
	return batch, drained && w.flushing, false
}

// linger waits until idle fires for frames, and reports whether the write
// loop goes on; if not, it has marked the loop stopped. A paused writer
// stops at once: resume starts it again.
func (w *writer) linger(idle *time.Timer, batch []outFrame) bool {
	w.mu.Lock()
	paused := w.paused
	w.mu.Unlock()
	if !paused {
		select {
		case <-w.wake:
			idle.Stop()
			return true
		case <-w.t.done:
			idle.Stop()
			return true // the loop's next turn sees it
		case <-idle.C:
		}
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.paused && (len(w.ctrl) > 0 || w.pong != nil || len(w.ready) > 0 || w.flushing) {
		return true // queued just as the wait ended
	}
	w.batch = batch[:0]
	w.exitLocked(false)
	return false
}
