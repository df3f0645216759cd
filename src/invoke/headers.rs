//! Header work of the raw surface: hop-by-hop headers stripped both ways (RFC 9110 7.6.1),
//! `X-Forwarded-*`, the call id, `X-Start-Time` and W3C `traceparent`.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

pub static X_CALL_ID: HeaderName = HeaderName::from_static("x-call-id");
pub static X_START_TIME: HeaderName = HeaderName::from_static("x-start-time");
pub static X_DURATION_SECONDS: HeaderName = HeaderName::from_static("x-duration-seconds");
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
];

/// Removes the headers that belong to one connection, including those the `Connection`
/// header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none or only `Connection`: one pass over the few names present
    // is cheaper than nine hashed removals.
    let is_hop =
        |name: &HeaderName| HOP_BY_HOP.contains(name) || name == header::PROXY_AUTHENTICATE;
    if !headers.keys().any(is_hop) {
        return;
    }
    if let Some(connection) = headers.get(header::CONNECTION) {
        let named: Vec<HeaderName> = connection
            .to_str()
            .unwrap_or("")
            .split(',')
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::PROXY_AUTHENTICATE);
}

/// The caller's `X-Call-Id` when it sent a usable one, a new one otherwise.
pub fn call_id(headers: &HeaderMap) -> HeaderValue {
    match headers.get(&X_CALL_ID) {
        Some(v) if !v.is_empty() && v.len() <= 128 => v.clone(),
        _ => new_call_id(),
    }
}

/// The caller's `X-Call-Id` when it is a uuid, so it can name a run (run names are uuids).
pub fn run_name_of(headers: &HeaderMap) -> Option<String> {
    headers
        .get(&X_CALL_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|id| uuid::Uuid::parse_str(id).is_ok())
        .map(str::to_string)
}

pub fn new_call_id() -> HeaderValue {
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let id = crate::model::new_id().hyphenated().encode_lower(&mut buf);
    HeaderValue::from_str(id).expect("a uuid is a valid header value")
}

/// A new W3C trace context, sampled, for a request that came without one.
pub fn new_traceparent() -> HeaderValue {
    // Hex by hand into a stack buffer: `format!` of a u128 showed as 1% of a proxied call.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut buf = *b"00-00000000000000000000000000000000-0000000000000000-01";
    let (trace, span) = (fastrand::u128(1..), fastrand::u64(1..));
    for i in 0..32 {
        buf[3 + i] = HEX[((trace >> (124 - 4 * i)) & 0xf) as usize];
    }
    for i in 0..16 {
        buf[36 + i] = HEX[((span >> (60 - 4 * i)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&buf).expect("hex digits are a valid header value")
}

/// A duration as OpenFaaS writes `X-Duration-Seconds`: seconds with six decimals.
pub fn seconds(took: std::time::Duration) -> HeaderValue {
    use std::io::Write;
    let mut buf = [0u8; 32];
    let mut out = &mut buf[..];
    let _ = write!(out, "{}.{:06}", took.as_secs(), took.subsec_micros());
    let len = 32 - out.len();
    HeaderValue::from_bytes(&buf[..len]).expect("digits are a valid header value")
}

/// The client end of a connection, worked out once per connection rather than per request.
#[derive(Clone)]
pub struct Peer {
    pub ip: IpAddr,
    /// The address as an `X-Forwarded-For` value.
    pub forwarded_for: HeaderValue,
}

impl Peer {
    pub fn new(ip: IpAddr) -> Self {
        Peer {
            ip,
            forwarded_for: HeaderValue::from_str(&ip.to_string())
                .expect("an IP address is a valid header value"),
        }
    }
}

/// Rewrites a client's request headers for the upstream: hop-by-hop removed, `Host` moved
/// to `X-Forwarded-Host` (the upstream's own goes in when the endpoint is chosen), the
/// client's address appended to `X-Forwarded-For`, call id, start time and trace context set.
pub fn to_upstream(
    headers: &mut HeaderMap,
    peer: &Peer,
    call_id: &HeaderValue,
    start_time: &HeaderValue,
) {
    strip_hop_by_hop(headers);
    if let Some(host) = headers.remove(header::HOST)
        && !headers.contains_key(&X_FORWARDED_HOST)
    {
        headers.insert(X_FORWARDED_HOST.clone(), host);
    }
    let forwarded = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prior) => HeaderValue::from_str(&format!("{prior}, {}", peer.ip)).ok(),
        None => Some(peer.forwarded_for.clone()),
    };
    if let Some(forwarded) = forwarded {
        headers.insert(X_FORWARDED_FOR.clone(), forwarded);
    }
    headers.insert(X_CALL_ID.clone(), call_id.clone());
    headers.insert(X_START_TIME.clone(), start_time.clone());
    if !headers.contains_key(&TRACEPARENT) {
        headers.insert(TRACEPARENT.clone(), new_traceparent());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_headers_are_rewritten() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("gw.example"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(&X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        h.insert("x-app", HeaderValue::from_static("kept"));
        let id = HeaderValue::from_static("abc");
        let peer = Peer::new("127.0.0.1".parse().unwrap());
        to_upstream(&mut h, &peer, &id, &HeaderValue::from(42u64));
        assert!(h.get(header::HOST).is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert!(h.get("x-secret-hop").is_none());
        assert!(h.get("keep-alive").is_none());
        assert_eq!(h["x-forwarded-host"], "gw.example");
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(h["x-call-id"], "abc");
        assert_eq!(h["x-start-time"], "42");
        assert_eq!(h["x-app"], "kept");
        let tp = h["traceparent"].to_str().unwrap();
        let parts: Vec<&str> = tp.split('-').collect();
        assert_eq!(parts.len(), 4, "{tp}");
        assert_eq!((parts[0], parts[3]), ("00", "01"));
        assert_eq!((parts[1].len(), parts[2].len()), (32, 16));
        assert!(parts[1].chars().all(|c| c.is_ascii_hexdigit()) && parts[1] != "0".repeat(32));
    }

    #[test]
    fn durations_are_written_as_openfaas_does() {
        let d = std::time::Duration::from_micros(1_234_567);
        assert_eq!(seconds(d), "1.234567");
        assert_eq!(seconds(std::time::Duration::from_micros(42)), "0.000042");
    }

    #[test]
    fn a_callers_trace_and_call_id_are_kept() {
        let mut h = HeaderMap::new();
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        h.insert(&TRACEPARENT, HeaderValue::from_static(tp));
        h.insert(&X_CALL_ID, HeaderValue::from_static("mine"));
        let id = call_id(&h);
        assert_eq!(id, "mine");
        let peer = Peer::new("::1".parse().unwrap());
        to_upstream(&mut h, &peer, &id, &HeaderValue::from(1u64));
        assert_eq!(h["traceparent"], tp);
        assert_eq!(call_id(&HeaderMap::new()).len(), 36);
    }
}
