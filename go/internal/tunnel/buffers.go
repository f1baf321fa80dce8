package tunnel

import "google.golang.org/grpc/mem"

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
