//! Settings (spec §4.3), version negotiation (§4.2) and the heartbeat
//! interval (§11).

use std::time::Duration;

use tonic::Code;

use super::defaults::*;
use super::frame::{TunnelError, duration, to_pb_duration};
use crate::proto::pluginframework::v1 as pb;

/// Limits with every default applied: what a side accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    pub(crate) max_message_size: u32,
    pub(crate) initial_window_size: u32,
    pub(crate) max_concurrent_streams: u32,
    pub(crate) max_batch_size: u32,
    /// The heartbeat preference; `None` when the side has none.
    pub(crate) heartbeat: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            initial_window_size: DEFAULT_INITIAL_WINDOW_SIZE,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            max_batch_size: DEFAULT_MAX_BATCH_SIZE,
            heartbeat: None,
        }
    }
}

impl Limits {
    /// This side's settings as sent in its `Hello`: every size limit
    /// explicitly, the heartbeat only when there is a preference.
    pub(crate) fn to_pb(self) -> pb::Settings {
        pb::Settings {
            max_message_size: self.max_message_size,
            initial_window_size: self.initial_window_size,
            max_concurrent_streams: self.max_concurrent_streams,
            heartbeat_interval: self.heartbeat.map(to_pb_duration),
            max_batch_size: self.max_batch_size,
        }
    }

    /// Validates the peer's settings and applies defaults.
    pub(crate) fn from_peer(s: Option<&pb::Settings>) -> Result<Self, TunnelError> {
        let d = Self::default();
        let Some(s) = s else { return Ok(d) };
        let bad = |detail: String| TunnelError::new(Code::InvalidArgument, format!("bad settings: {detail}"));
        let or = |v: u32, def: u32| if v == 0 { def } else { v };
        if s.max_message_size > MAX_SETTING {
            return Err(bad(format!("max_message_size {} above 2^31-1", s.max_message_size)));
        }
        if s.initial_window_size != 0 && !(MIN_INITIAL_WINDOW_SIZE..=MAX_SETTING).contains(&s.initial_window_size) {
            return Err(bad(format!("initial_window_size {} outside 1024 to 2^31-1", s.initial_window_size)));
        }
        if s.max_concurrent_streams > MAX_SETTING {
            return Err(bad(format!("max_concurrent_streams {} above 2^31-1", s.max_concurrent_streams)));
        }
        if s.max_batch_size != 0 && !(MIN_MAX_BATCH_SIZE..=MAX_SETTING).contains(&s.max_batch_size) {
            return Err(bad(format!("max_batch_size {} outside 65536 to 2^31-1", s.max_batch_size)));
        }
        let heartbeat = match &s.heartbeat_interval {
            None => None,
            Some(h) => match duration(h) {
                None => return Err(bad("heartbeat_interval is not a valid duration".into())),
                Some(Err(())) => return Err(bad("heartbeat_interval is negative".into())),
                Some(Ok(d)) if d.is_zero() => None,
                Some(Ok(d)) => Some(d),
            },
        };
        Ok(Self {
            max_message_size: or(s.max_message_size, d.max_message_size),
            initial_window_size: or(s.initial_window_size, d.initial_window_size),
            max_concurrent_streams: or(s.max_concurrent_streams, d.max_concurrent_streams),
            max_batch_size: or(s.max_batch_size, d.max_batch_size),
            heartbeat,
        })
    }
}

/// Negotiates the version with the peer's `Hello` (spec §4.2).
pub(crate) fn negotiate(peer_min: u32, peer_max: u32) -> Result<u32, TunnelError> {
    let v = peer_max.min(VERSION);
    if v >= peer_min.max(VERSION) {
        Ok(v)
    } else {
        Err(TunnelError::new(
            Code::FailedPrecondition,
            format!("no common protocol version: peer speaks {peer_min}-{peer_max}, this side {VERSION}-{VERSION}"),
        ))
    }
}

/// This side's heartbeat interval: the larger preference (10 s if neither
/// side has one), at least 100 ms, at most this side's maximum (spec §11).
pub(crate) fn heartbeat_interval(own: Option<Duration>, peer: Option<Duration>, max: Option<Duration>) -> Duration {
    let i = match (own, peer) {
        (None, None) => DEFAULT_HEARTBEAT_INTERVAL,
        (a, b) => a.max(b).unwrap_or(DEFAULT_HEARTBEAT_INTERVAL),
    };
    let i = i.max(MIN_HEARTBEAT_INTERVAL);
    match max {
        Some(m) => i.min(m),
        None => i,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation() {
        assert_eq!(negotiate(2, 2).unwrap(), 2);
        assert_eq!(negotiate(1, 3).unwrap(), 2);
        let e = negotiate(1, 1).unwrap_err();
        assert_eq!(e.0.code, Code::FailedPrecondition as i32);
        assert!(e.0.message.contains("peer speaks 1-1, this side 2-2"), "{}", e.0.message);
        assert!(negotiate(0, 0).is_err());
        assert!(negotiate(3, 4).is_err());
    }

    #[test]
    fn peer_settings() {
        assert_eq!(Limits::from_peer(None).unwrap(), Limits::default());
        let s = pb::Settings { initial_window_size: 1023, ..Default::default() };
        assert!(Limits::from_peer(Some(&s)).unwrap_err().0.message.starts_with("bad settings: "));
        let s = pb::Settings { max_batch_size: 65535, ..Default::default() };
        assert!(Limits::from_peer(Some(&s)).is_err());
        let s = pb::Settings { max_message_size: 1 << 31, ..Default::default() };
        assert!(Limits::from_peer(Some(&s)).is_err());
        let s = pb::Settings {
            heartbeat_interval: Some(prost_types::Duration { seconds: -1, nanos: 0 }),
            ..Default::default()
        };
        assert!(Limits::from_peer(Some(&s)).is_err());
        let s = pb::Settings { initial_window_size: 1024, max_batch_size: 65536, ..Default::default() };
        let l = Limits::from_peer(Some(&s)).unwrap();
        assert_eq!((l.initial_window_size, l.max_batch_size, l.max_message_size), (1024, 65536, 4 << 20));
    }

    #[test]
    fn heartbeat() {
        let s = Duration::from_secs;
        assert_eq!(heartbeat_interval(None, None, None), s(10));
        assert_eq!(heartbeat_interval(None, Some(s(3)), None), s(3));
        assert_eq!(heartbeat_interval(Some(s(5)), Some(s(3)), None), s(5));
        assert_eq!(heartbeat_interval(None, Some(Duration::from_millis(1)), None), Duration::from_millis(100));
        assert_eq!(heartbeat_interval(None, Some(s(60)), Some(s(20))), s(20));
    }
}
