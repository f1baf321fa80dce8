//! Metadata rules (spec §9.1) and the conversion between the tunnel's raw
//! entries and tonic's HTTP headers, where `-bin` values are base64.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::proto::pluginframework::v1::MetadataEntry;

/// tonic writes `-bin` values without padding and reads either form.
const B64_OUT: base64::engine::GeneralPurpose = STANDARD_NO_PAD;

fn valid_key(k: &str) -> bool {
    let b = k.as_bytes();
    !b.is_empty()
        && b.iter()
            .enumerate()
            .all(|(i, &c)| matches!(c, b'0'..=b'9' | b'a'..=b'z' | b'-' | b'_' | b'.') || (i == 0 && c == b':'))
}

/// Keys never carried through the tunnel, dropped on receipt.
pub(crate) fn reserved(k: &str) -> bool {
    k.starts_with(':')
        || (k.starts_with("grpc-") && k != "grpc-trace-bin")
        || matches!(k, "content-type" | "te" | "user-agent" | "connection")
}

fn printable(v: &[u8]) -> bool {
    v.iter().all(|&c| (0x20..=0x7e).contains(&c))
}

/// Checks received entries and returns them without reserved keys and
/// empty entries, repeated keys merged in order. `Err` is the detail of
/// `malformed metadata: <detail>`.
pub(crate) fn check(entries: Vec<MetadataEntry>) -> Result<Vec<MetadataEntry>, String> {
    let mut out: Vec<MetadataEntry> = Vec::with_capacity(entries.len());
    for e in entries {
        if !valid_key(&e.key) {
            return Err(format!("invalid metadata key {:?}", e.key));
        }
        if !e.key.ends_with("-bin") && !e.values.iter().all(|v| printable(v)) {
            return Err(format!("metadata key {:?} has a non-printable value", e.key));
        }
        if reserved(&e.key) || e.values.is_empty() {
            continue;
        }
        match out.iter_mut().find(|o| o.key == e.key) {
            Some(o) => o.values.extend(e.values),
            None => out.push(e),
        }
    }
    Ok(out)
}

/// Appends checked entries to HTTP headers as tonic expects them: `-bin`
/// values base64-encoded.
pub(crate) fn to_headers(entries: &[MetadataEntry], headers: &mut HeaderMap) {
    for e in entries {
        // check() accepted the key, so it is a valid header name.
        let Ok(name) = HeaderName::from_bytes(e.key.as_bytes()) else { continue };
        let bin = e.key.ends_with("-bin");
        for v in &e.values {
            let value = if bin {
                HeaderValue::from_maybe_shared(Bytes::from(B64_OUT.encode(v)))
            } else {
                HeaderValue::from_maybe_shared(v.clone())
            };
            if let Ok(value) = value {
                headers.append(name.clone(), value);
            }
        }
    }
}

/// Converts tonic's headers or trailers to entries, leaving out reserved
/// keys and decoding `-bin` values. `Err` names what the tunnel cannot
/// carry (a key outside its alphabet, a non-printable value, bad base64).
pub(crate) fn from_headers(headers: &HeaderMap) -> Result<Vec<MetadataEntry>, String> {
    let mut out: Vec<MetadataEntry> = Vec::new();
    for key in headers.keys() {
        let k = key.as_str();
        if reserved(k) {
            continue;
        }
        if !valid_key(k) {
            return Err(format!("invalid metadata key {k:?}"));
        }
        let bin = k.ends_with("-bin");
        let mut values = Vec::new();
        for v in headers.get_all(key) {
            if bin {
                let raw = v.as_bytes();
                let decoded = STANDARD_NO_PAD
                    .decode(raw)
                    .or_else(|_| STANDARD.decode(raw))
                    .map_err(|_| format!("metadata key {k:?} has a value that is not base64"))?;
                values.push(Bytes::from(decoded));
            } else if printable(v.as_bytes()) {
                values.push(Bytes::copy_from_slice(v.as_bytes()));
            } else {
                return Err(format!("metadata key {k:?} has a non-printable value"));
            }
        }
        if !values.is_empty() {
            out.push(MetadataEntry { key: k.to_owned(), values });
        }
    }
    Ok(out)
}

/// Appends `more` to `into`, merging entries of the same key.
pub(crate) fn merge(into: &mut Vec<MetadataEntry>, more: Vec<MetadataEntry>) {
    for e in more {
        match into.iter_mut().find(|o| o.key == e.key) {
            Some(o) => o.values.extend(e.values),
            None => into.push(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(k: &str, vs: &[&[u8]]) -> MetadataEntry {
        MetadataEntry { key: k.into(), values: vs.iter().map(|v| Bytes::copy_from_slice(v)).collect() }
    }

    #[test]
    fn reserved_keys_are_dropped_after_the_check() {
        let got = check(vec![
            entry("x-a", &[b"1"]),
            entry(":authority", &[b"h"]),
            entry("grpc-timeout", &[b"1S"]),
            entry("grpc-trace-bin", &[b"\x00"]),
            entry("user-agent", &[b"u"]),
            entry("x-a", &[b"2"]),
            entry("x-empty", &[]),
        ])
        .unwrap();
        assert_eq!(got, vec![entry("x-a", &[b"1", b"2"]), entry("grpc-trace-bin", &[b"\x00"])]);
        assert!(check(vec![entry("X-Upper", &[b"v"])]).unwrap_err().contains("invalid metadata key"));
        assert!(check(vec![entry("a:b", &[b"v"])]).is_err());
        assert!(check(vec![entry("x", &[b"tab\there"])]).unwrap_err().contains("non-printable"));
        assert!(check(vec![entry("x-bin", &[b"\x00\xff"])]).is_ok());
    }

    #[test]
    fn binary_values_round_trip_through_base64_headers() {
        let entries = vec![entry("x-data-bin", &[b"\x00\x01\x02\xfd\xfe\xff", b""]), entry("x-t", &[b"a", b"b"])];
        let mut h = HeaderMap::new();
        to_headers(&entries, &mut h);
        assert_eq!(h.get("x-data-bin").unwrap(), "AAEC/f7/");
        let md = tonic::metadata::MetadataMap::from_headers(h.clone());
        assert_eq!(md.get_bin("x-data-bin").unwrap().to_bytes().unwrap().as_ref(), b"\x00\x01\x02\xfd\xfe\xff");
        h.insert("content-type", HeaderValue::from_static("application/grpc"));
        assert_eq!(from_headers(&h).unwrap(), entries);
    }
}
