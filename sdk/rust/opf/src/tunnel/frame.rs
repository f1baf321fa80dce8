//! Frame constructors, sizes and status helpers.

use prost::Message;
use tonic::Code;

use crate::proto::google::rpc;
use crate::proto::pluginframework::v1 as pb;
use pb::frame::Kind;

/// A status as the tunnel carries it (`google.rpc.Status`).
pub(crate) type RpcStatus = rpc::Status;

pub(crate) fn status(code: Code, message: impl Into<String>) -> RpcStatus {
    RpcStatus { code: code as i32, message: message.into(), details: Vec::new() }
}

/// The code of a received status; codes outside 0–16 become UNKNOWN
/// (spec §10.1).
pub(crate) fn code_of(s: &RpcStatus) -> Code {
    if (0..=16).contains(&s.code) { Code::from_i32(s.code) } else { Code::Unknown }
}

/// Converts a received status to a `tonic::Status`, keeping its details.
pub(crate) fn to_tonic(s: &RpcStatus) -> tonic::Status {
    let code = code_of(s);
    if s.details.is_empty() {
        tonic::Status::new(code, s.message.clone())
    } else {
        let bin = RpcStatus { code: code as i32, ..s.clone() }.encode_to_vec();
        tonic::Status::with_details(code, s.message.clone(), bin.into())
    }
}

pub(crate) fn frame(stream_id: u64, kind: Kind) -> pb::Frame {
    pb::Frame { stream_id, kind: Some(kind) }
}

/// A `GoAway`; `last_stream_id` is the highest stream the peer opened
/// that this side received (spec §12.1).
pub(crate) fn go_away(s: RpcStatus, last_stream_id: u64) -> pb::Frame {
    frame(0, Kind::GoAway(pb::GoAway { reason: Some(s), last_stream_id: Some(last_stream_id) }))
}

pub(crate) fn close(stream_id: u64, s: RpcStatus, trailers: Vec<pb::MetadataEntry>) -> pb::Frame {
    frame(stream_id, Kind::Close(pb::StreamClose { status: Some(s), trailers }))
}

pub(crate) fn cancel(stream_id: u64, s: RpcStatus) -> pb::Frame {
    frame(stream_id, Kind::Cancel(pb::StreamCancel { status: Some(s) }))
}

pub(crate) fn window_update(stream_id: u64, increment: u32) -> pb::Frame {
    frame(stream_id, Kind::WindowUpdate(pb::WindowUpdate { increment }))
}

/// Bytes a frame adds to the encoding of a batch: its tag, its length and
/// its encoding.
pub(crate) fn frame_len(f: &pb::Frame) -> usize {
    let n = f.encoded_len();
    1 + prost::length_delimiter_len(n) + n
}

/// The frame kind's field number, as the spec's messages name kinds.
pub(crate) fn kind_number(k: &Kind) -> u32 {
    match k {
        Kind::Hello(_) => 2,
        Kind::Register(_) => 3,
        Kind::RegisterAck(_) => 4,
        Kind::RegisterReject(_) => 5,
        Kind::Ping(_) => 6,
        Kind::Pong(_) => 7,
        Kind::GoAway(_) => 8,
        Kind::Open(_) => 10,
        Kind::Headers(_) => 11,
        Kind::Message(_) => 12,
        Kind::HalfClose(_) => 13,
        Kind::Cancel(_) => 14,
        Kind::Close(_) => 15,
        Kind::WindowUpdate(_) => 16,
    }
}

/// The kind's name in the schema (the `Frame` oneof), as the spec's
/// reference texts name frames.
pub(crate) fn kind_name(k: &Kind) -> &'static str {
    match k {
        Kind::Hello(_) => "hello",
        Kind::Register(_) => "register",
        Kind::RegisterAck(_) => "register_ack",
        Kind::RegisterReject(_) => "register_reject",
        Kind::Ping(_) => "ping",
        Kind::Pong(_) => "pong",
        Kind::GoAway(_) => "go_away",
        Kind::Open(_) => "open",
        Kind::Headers(_) => "headers",
        Kind::Message(_) => "message",
        Kind::HalfClose(_) => "half_close",
        Kind::Cancel(_) => "cancel",
        Kind::Close(_) => "close",
        Kind::WindowUpdate(_) => "window_update",
    }
}

/// Whether a kind is a stream frame (10–16).
pub(crate) fn is_stream_kind(k: &Kind) -> bool {
    kind_number(k) >= 10
}

/// A violation of the tunnel as a whole (spec §10.4): reported with a
/// `GoAway`, then the tunnel closes.
#[derive(Debug, Clone)]
pub(crate) struct TunnelError(pub(crate) RpcStatus);

impl TunnelError {
    pub(crate) fn new(code: Code, message: impl Into<String>) -> Self {
        Self(status(code, message))
    }
}

/// Validates a `google.protobuf.Duration` (spec §4.3) and converts it;
/// `None` when invalid, negative values included as `Err`.
pub(crate) fn duration(d: &prost_types::Duration) -> Option<Result<std::time::Duration, ()>> {
    let (s, n) = (d.seconds, d.nanos);
    let valid = n.abs() < 1_000_000_000 && s.abs() <= 315_576_000_000 && !(s > 0 && n < 0) && !(s < 0 && n > 0);
    if !valid {
        return None;
    }
    if s < 0 || n < 0 {
        return Some(Err(()));
    }
    Some(Ok(std::time::Duration::new(s as u64, n as u32)))
}

pub(crate) fn to_pb_duration(d: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_outside_range_are_unknown() {
        assert_eq!(code_of(&status(Code::Aborted, "")), Code::Aborted);
        assert_eq!(code_of(&RpcStatus { code: 99, ..Default::default() }), Code::Unknown);
        assert_eq!(code_of(&RpcStatus { code: -1, ..Default::default() }), Code::Unknown);
    }

    #[test]
    fn durations() {
        let d = |seconds, nanos| duration(&prost_types::Duration { seconds, nanos });
        assert_eq!(d(1, 5), Some(Ok(std::time::Duration::new(1, 5))));
        assert_eq!(d(-1, 0), Some(Err(())));
        assert_eq!(d(1, -5), None);
        assert_eq!(d(0, 1_000_000_000), None);
        assert_eq!(d(315_576_000_001, 0), None);
    }

    #[test]
    fn frame_len_matches_the_batch_encoding() {
        let frames = vec![
            window_update(7, 1000),
            frame(1, Kind::Message(pb::StreamMessage { size: 300, data: vec![7u8; 300].into() })),
        ];
        let total: usize = frames.iter().map(frame_len).sum();
        assert_eq!(pb::ConnectRequest { frames }.encoded_len(), total);
    }
}
