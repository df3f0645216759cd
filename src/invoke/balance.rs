//! Picking an endpoint: power of two choices on calls in flight, skipping ejected endpoints
//! and the ones this call already tried. When every endpoint is ejected the call still goes
//! somewhere (as Envoy's panic threshold does) rather than failing without trying.

use std::sync::Arc;

use super::pool::HostPool;

/// One endpoint of one function: the shared pool and the path prefix this function's calls
/// get on it.
pub struct Endpoint {
    pub pool: Arc<HostPool>,
    pub path_prefix: String,
}

/// Index of the endpoint for the next attempt. `tried` has bit `i % 64` set for each
/// endpoint already tried by this call.
pub fn pick(endpoints: &[Endpoint], tried: u64) -> usize {
    let n = endpoints.len();
    if n <= 1 {
        return 0;
    }
    let usable = |i: usize| tried & (1 << (i % 64)) == 0 && !endpoints[i].pool.is_ejected();
    let a = fastrand::usize(..n);
    let mut b = fastrand::usize(..n - 1);
    if b >= a {
        b += 1;
    }
    match (usable(a), usable(b)) {
        (true, true) => {
            if endpoints[b].pool.inflight() < endpoints[a].pool.inflight() {
                b
            } else {
                a
            }
        }
        (true, false) => a,
        (false, true) => b,
        (false, false) => {
            let start = fastrand::usize(..n);
            let ring = (0..n).map(|k| (start + k) % n);
            ring.clone()
                .find(|&i| usable(i))
                .or_else(|| ring.clone().find(|&i| tried & (1 << (i % 64)) == 0))
                .unwrap_or(a)
        }
    }
}

/// Whether every endpoint has been tried by this call.
pub fn all_tried(endpoints: &[Endpoint], tried: u64) -> bool {
    (0..endpoints.len().min(64)).all(|i| tried & (1 << i) != 0)
}
