package tunnel

import (
	"math/bits"
	"sync"

	"google.golang.org/grpc/mem"
)

// Buffer ownership.
//
// Message data crosses the engine in gRPC's pooled, reference-counted
// mem.Buffers, so that a large message is neither copied into a batch on
// the way out nor out of it on the way in. The rule: every reference has
// exactly one owner, who frees it exactly once, on every path, error paths
// included. Nothing keeps a plain slice of pooled memory it does not hold a
// reference to: once the last reference is freed, the pool hands the
// memory to the next message.
//
// Sending:
//
//  1. codec.marshal returns data and the buffer behind it, if pooled; the
//     caller owns that one reference.
//  2. stream.writeMessage gives each chunk frame its own reference (a view,
//     mem.Buffer.Slice) whatever the chunk's size, and frees the caller's
//     before it returns.
//  3. A chunk frame's reference belongs to the stream's queue in the writer
//     until collect moves it into a batch. writer.discard frees what an
//     aborted stream still has queued, and enqueueOut frees frames queued
//     after the abort.
//  4. From Transport.Send on, the batch's references belong to the
//     transport: encodeBatch copies a small chunk into the batch's encoding
//     and frees its reference at once, and hands a large chunk's reference
//     to the encoded mem.BufferSlice, which gRPC frees once written.
//     encodeBatch frees what it could not encode; grpcTransport.Send frees
//     the batch when gRPC fails before encoding it.
//
// Receiving:
//
//  1. wireCodec.Unmarshal copies what gRPC received into one pooled root
//     buffer and owns it while it decodes.
//  2. Each chunk frame gets its own buffer (inFrame.buf): a view of the root
//     when the chunk is at least half of the batch, so that a chunk kept in
//     a queue never pins more than twice its size, else a copy. Unmarshal
//     then frees its own reference to the root.
//  3. handleFrame owns an inFrame's buffer; stream.onMessage keeps it in the
//     stream's chunk queue, or frees it when the chunk is refused.
//  4. The consumer (recvMsg) takes a one-chunk message's buffer and frees it
//     once the message is decoded. It copies the chunks of a longer message
//     into one pooled buffer, freeing each chunk's buffer after its copy.
//  5. A stream that ends (cancelled, aborted, closed, or its tunnel closed)
//     frees its queued chunks and its partial message under its lock.
//
// The race detector and TestStress (internal/integration), which checks
// every byte of random traffic, are the proof.

// aliasable reports whether a received chunk of n bytes may stay a view of
// its batch's buffer of batch bytes rather than be copied (receiving, 2).
func aliasable(n, batch int) bool { return n >= referenceThreshold && 2*n >= batch }

// freeBuffer releases b if set.
func freeBuffer(b mem.Buffer) {
	if b != nil {
		b.Free()
	}
}

// BufferPool is where the engine takes the buffers it fills completely
// before anyone reads them: a received batch's root, a copied chunk, a
// message being assembled (receiving, 1, 2 and 4); a partially assembled
// message is freed unread (receiving, 5). The server and the client give
// it to gRPC for their tunnel connections too (experimental.BufferPool),
// whose transport reads each HTTP/2 DATA frame over the whole buffer it
// takes. gRPC's default pool clears every buffer it hands out, which was
// about a fifth of the CPU a 1 MiB stream cost; a buffer from this pool
// holds whatever its previous user left, so code that does not overwrite
// all of it before reading must not take one.
var BufferPool mem.BufferPool = newTieredPool(10, 22)

// tieredPool keeps free buffers in sync.Pools of capacity 2^lo to 2^hi
// bytes; larger requests are allocated and dropped.
type tieredPool struct {
	lo    int
	tiers []sync.Pool
}

func newTieredPool(lo, hi int) *tieredPool {
	return &tieredPool{lo: lo, tiers: make([]sync.Pool, hi-lo+1)}
}

// tier is the smallest tier whose buffers hold n bytes, or -1.
func (p *tieredPool) tier(n int) int {
	if n <= 0 {
		return 0
	}
	t := max(bits.Len(uint(n-1)), p.lo) - p.lo
	if t >= len(p.tiers) {
		return -1
	}
	return t
}

func (p *tieredPool) Get(n int) *[]byte {
	t := p.tier(n)
	if t < 0 {
		b := make([]byte, n)
		return &b
	}
	if b, ok := p.tiers[t].Get().(*[]byte); ok {
		*b = (*b)[:n]
		return b
	}
	b := make([]byte, n, 1<<(p.lo+t))
	return &b
}

func (p *tieredPool) Put(b *[]byte) {
	c := cap(*b)
	t := p.tier(c)
	if t < 0 || c != 1<<(p.lo+t) {
		return // not one of ours
	}
	p.tiers[t].Put(b)
}
