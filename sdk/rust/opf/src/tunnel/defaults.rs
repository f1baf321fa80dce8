//! Protocol constants (docs/tunnel-spec.md, Appendix A) and the SDK's local
//! tuning choices, kept together.

use std::time::Duration;

/// The only protocol version this SDK speaks (spec §4.2).
pub(crate) const VERSION: u32 = 2;

// Settings defaults and bounds (spec §4.3).
pub(crate) const DEFAULT_MAX_MESSAGE_SIZE: u32 = 4 << 20;
pub(crate) const DEFAULT_INITIAL_WINDOW_SIZE: u32 = 2 << 20;
pub(crate) const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 100;
pub(crate) const DEFAULT_MAX_BATCH_SIZE: u32 = 4 << 20;
pub(crate) const MIN_INITIAL_WINDOW_SIZE: u32 = 1024;
pub(crate) const MIN_MAX_BATCH_SIZE: u32 = 64 << 10;
pub(crate) const MAX_SETTING: u32 = (1 << 31) - 1;

/// Credit each `StreamMessage` costs besides its data (spec §8.1).
pub(crate) const CHUNK_COST: i64 = 64;
/// Most frames in one batch (spec §3.1).
pub(crate) const MAX_FRAMES_PER_BATCH: usize = 4096;
/// Batch limit until the sender is registered (spec §3.3).
pub(crate) const UNREGISTERED_BATCH_LIMIT: usize = 64 << 10;
/// Most bytes of a chunk's encoding besides its data (spec §3.3).
pub(crate) const CHUNK_OVERHEAD: usize = 64;
/// Longest `replica_id` a plugin accepts (spec §4.7).
pub(crate) const MAX_REPLICA_ID: usize = 253;

// Heartbeats (spec §11).
pub(crate) const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);
pub(crate) const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(100);

// Local choices.

/// Largest chunk of message data the writer puts in one frame: large enough
/// that a 1 MiB message is one frame, small enough that one stream does not
/// hold the writer for long (the Go implementation's choice too).
pub(crate) const MAX_CHUNK: usize = 2 << 20;
/// Kept free in every batch for the batch's own encoding.
pub(crate) const BATCH_RESERVE: usize = 1 << 10;
/// Bound of the control queue (spec §3.4, the Go bound).
pub(crate) const CONTROL_QUEUE_MAX: usize = 16_384;
/// A handler's response messages queued ahead of the writer, in bytes,
/// before the handler is made to wait: one large message may always be
/// queued whole.
pub(crate) const STREAM_QUEUE_BYTES: usize = 1 << 20;
/// How long to wait for the operator to end the `Connect` call after the
/// plugin half-closed it (spec §12.4).
pub(crate) const CLOSE_WAIT: Duration = Duration::from_secs(1);
/// How long a tunnel error's `GoAway` may take to leave before closing.
pub(crate) const ERROR_FLUSH_WAIT: Duration = Duration::from_secs(1);
