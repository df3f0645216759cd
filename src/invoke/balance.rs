//! Picking an endpoint: the one with the fewest calls in flight, skipping ejected endpoints
//! and the ones this call already tried. Up to [`SCAN_UP_TO`] endpoints (a function's pods,
//! most often) every one is looked at, ties settled at random; past that,
//! the better of two random choices (as Envoy's LEAST_REQUEST does), which is O(1) and
//! nearly as even. When every endpoint is ejected the call still goes somewhere (as
//! Envoy's panic threshold does) rather than failing without trying.

use std::sync::Arc;

use super::pool::HostPool;

/// Up to this many endpoints the pick is exact: N relaxed loads cost less than a cache
/// miss, and a busy pod among few is never chosen while another has fewer calls.
const SCAN_UP_TO: usize = 8;

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
    let untried = |i: usize| tried & (1 << (i % 64)) == 0;
    let usable = |i: usize| untried(i) && !endpoints[i].pool.is_ejected();
    if n <= SCAN_UP_TO {
        // Ties are settled by reservoir sampling: each of k tied endpoints has 1/k.
        let (mut best, mut fewest, mut ties) = (None, usize::MAX, 0);
        for i in (0..n).filter(|&i| usable(i)) {
            let inflight = endpoints[i].pool.inflight();
            if inflight < fewest {
                (best, fewest, ties) = (Some(i), inflight, 1);
            } else if inflight == fewest {
                ties += 1;
                if fastrand::usize(..ties) == 0 {
                    best = Some(i);
                }
            }
        }
        return best.unwrap_or_else(|| fallback(n, fastrand::usize(..n), untried));
    }
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
        (false, false) => (a..n)
            .chain(0..a)
            .find(|&i| usable(i))
            .unwrap_or_else(|| fallback(n, a, untried)),
    }
}

/// No endpoint usable: one this call has not tried (ejected, then), else any.
fn fallback(n: usize, start: usize, untried: impl Fn(usize) -> bool) -> usize {
    (start..n)
        .chain(0..start)
        .find(|&i| untried(i))
        .unwrap_or(start)
}

/// Whether every endpoint has been tried by this call.
pub fn all_tried(endpoints: &[Endpoint], tried: u64) -> bool {
    (0..endpoints.len().min(64)).all(|i| tried & (1 << i) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::drivers::Target;
    use crate::invoke::pool::Pools;
    use crate::metrics::Metrics;

    fn endpoints(pools: &Pools, n: usize) -> Vec<Endpoint> {
        (0..n)
            .map(|i| Endpoint {
                pool: pools.get(
                    &Target {
                        origin: format!("http://10.0.0.{i}:8080"),
                        authority: format!("10.0.0.{i}:8080"),
                        path_prefix: String::new(),
                    },
                    false,
                ),
                path_prefix: String::new(),
            })
            .collect()
    }

    fn load(endpoints: &[Endpoint], calls: &[usize]) {
        for (e, &n) in endpoints.iter().zip(calls) {
            for _ in 0..n {
                e.pool.start_call();
            }
        }
    }

    #[test]
    fn among_few_the_least_in_flight_is_always_picked_and_ties_spread() {
        let pools = Pools::new(Config::defaults().upstream, Arc::new(Metrics::new()));
        let eps = endpoints(&pools, 4);
        load(&eps, &[3, 1, 2, 5]);
        for _ in 0..200 {
            assert_eq!(pick(&eps, 0), 1);
        }
        // Tried already: the next fewest.
        assert_eq!(pick(&eps, 1 << 1), 2);
        // A tie between 1 and 2: both get picks.
        eps[2].pool.end_call();
        let mut seen = [0usize; 4];
        for _ in 0..400 {
            seen[pick(&eps, 0)] += 1;
        }
        assert_eq!(seen[0] + seen[3], 0, "{seen:?}");
        assert!(seen[1] > 150 && seen[2] > 150, "an even split: {seen:?}");
        // Ejected: skipped while another is usable, still picked when none is.
        eps[1].pool.eject();
        eps[2].pool.eject();
        assert_eq!(pick(&eps, 0), 0);
        for e in &eps {
            e.pool.eject();
        }
        assert_eq!(pick(&eps, 0b0111), 3, "the only one not tried");
    }

    #[test]
    fn among_many_the_busiest_is_never_picked() {
        let pools = Pools::new(Config::defaults().upstream, Arc::new(Metrics::new()));
        let eps = endpoints(&pools, SCAN_UP_TO + 4);
        let mut calls = vec![1; eps.len()];
        calls[5] = 9;
        load(&eps, &calls);
        for _ in 0..500 {
            assert_ne!(pick(&eps, 0), 5);
        }
    }
}
