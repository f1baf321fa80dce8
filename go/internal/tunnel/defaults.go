package tunnel

import "time"

// Protocol versions this implementation speaks.
const (
	MinVersion = 2
	MaxVersion = 2
)

// Defaults for Settings fields left at zero; docs/tunnel-spec.md lists the
// same values.
const (
	DefaultMaxMessageSize       = 4 << 20
	DefaultInitialWindowSize    = 2 << 20
	DefaultMaxConcurrentStreams = 100
	DefaultHeartbeatInterval    = 10 * time.Second
	DefaultMaxBatchSize         = 4 << 20

	// MinMaxBatchSize is the smallest batch limit a peer may advertise, so
	// that a chunk and its frame overhead always fit.
	MinMaxBatchSize = 64 << 10

	// MinHeartbeatInterval bounds how often a peer can make us ping.
	MinHeartbeatInterval = 100 * time.Millisecond
)

// Tuning constants that are local choices, not part of the protocol.
const (
	// maxChunkSize is the most message data put in one StreamMessage. Large
	// enough that a 1 MiB message costs few frames, small enough that one
	// stream's message does not hold the write loop for long.
	maxChunkSize = 2 << 20

	// frameOverhead bounds the encoded size of a message frame besides its
	// data (ids, sizes, tags, lengths), used to keep batches under the
	// peer's limit.
	frameOverhead = 64

	// batchReserve is kept free in every batch for the batch's own
	// encoding, so that a frame of maxFrameSize always fits.
	batchReserve = 1 << 10

	// windowUpdateDivisor: credit is returned once a quarter of the window
	// has been consumed, so one update covers many chunks.
	windowUpdateDivisor = 4

	// heartbeatTimeoutFactor: a peer silent for this many intervals is dead.
	// Below 2 so that a dead peer is detected within two intervals, above 1
	// so that a live peer's ping, sent every interval, always arrives first.
	heartbeatTimeoutFactor = 1.5

	// writerStopTimeout bounds how long Close waits for a write blocked in
	// the transport (a peer that stopped reading).
	writerStopTimeout = time.Second
)
