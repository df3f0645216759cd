//! Per-function concurrency limits: at most `maxInflight` calls at once, then up to
//! `maxQueue` callers wait (never past their deadline or the configured wait), then 429.
//! A function without a limit pays one branch.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::metrics::Rejection;

pub struct Limiter {
    /// What the limiter was built with (see [`Limiter::has_limits`]).
    max_inflight: u32,
    slots: Option<Arc<Semaphore>>,
    /// Callers waiting for a slot now.
    waiting: AtomicU32,
    max_queue: u32,
}

impl Limiter {
    /// `max_inflight` of 0 means no limit.
    pub fn new(max_inflight: u32, max_queue: u32) -> Self {
        Limiter {
            max_inflight,
            slots: (max_inflight > 0).then(|| Arc::new(Semaphore::new(max_inflight as usize))),
            waiting: AtomicU32::new(0),
            max_queue,
        }
    }

    /// Whether this limiter enforces these limits: an update of a function that keeps its
    /// limits keeps its limiter, so the calls in flight keep counting against it.
    pub fn has_limits(&self, max_inflight: u32, max_queue: u32) -> bool {
        self.max_inflight == max_inflight && self.max_queue == max_queue
    }

    /// A slot for one call, held until the call ends (dropping the permit frees it).
    pub async fn acquire(
        &self,
        wait_until: Instant,
    ) -> Result<Option<OwnedSemaphorePermit>, Rejection> {
        let Some(slots) = &self.slots else {
            return Ok(None);
        };
        if let Ok(permit) = slots.clone().try_acquire_owned() {
            return Ok(Some(permit));
        }
        let Some(_place) = QueuePlace::take(&self.waiting, self.max_queue) else {
            return Err(Rejection::QueueFull);
        };
        // `_place` is given back when this future ends or is dropped (the caller went away).
        let waited = tokio::time::timeout_at(wait_until, slots.clone().acquire_owned()).await;
        match waited {
            Ok(Ok(permit)) => Ok(Some(permit)),
            _ => Err(Rejection::QueueTimeout),
        }
    }
}

/// A place in a limiter's wait queue, given back on drop.
struct QueuePlace<'a>(&'a AtomicU32);

impl<'a> QueuePlace<'a> {
    fn take(waiting: &'a AtomicU32, max: u32) -> Option<Self> {
        if waiting.fetch_add(1, Ordering::AcqRel) >= max {
            waiting.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(QueuePlace(waiting))
    }
}

impl Drop for QueuePlace<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_full_queue_is_refused_and_a_slot_is_given_back() {
        let limiter = Arc::new(Limiter::new(1, 1));
        let later = Instant::now() + Duration::from_secs(5);
        let first = limiter.acquire(later).await.unwrap();
        let waiter = {
            let limiter = limiter.clone();
            tokio::spawn(async move { limiter.acquire(later).await.map(|p| p.is_some()) })
        };
        while limiter.waiting.load(Ordering::Acquire) == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            limiter.acquire(later).await.unwrap_err(),
            Rejection::QueueFull
        );
        drop(first);
        assert_eq!(waiter.await.unwrap(), Ok(true));
    }

    #[tokio::test]
    async fn a_wait_ends_at_its_limit() {
        let limiter = Limiter::new(1, 5);
        let _held = limiter.acquire(Instant::now()).await.unwrap();
        let soon = Instant::now() + Duration::from_millis(20);
        assert_eq!(
            limiter.acquire(soon).await.unwrap_err(),
            Rejection::QueueTimeout
        );
    }

    #[tokio::test]
    async fn a_waiter_that_goes_away_gives_its_place_back() {
        let limiter = Limiter::new(1, 1);
        let _held = limiter.acquire(Instant::now()).await.unwrap();
        let later = Instant::now() + Duration::from_secs(5);
        {
            let waiting = limiter.acquire(later);
            tokio::pin!(waiting);
            assert!(futures_poll_once(waiting.as_mut()).await.is_none());
            assert_eq!(limiter.waiting.load(Ordering::Acquire), 1);
        }
        assert_eq!(limiter.waiting.load(Ordering::Acquire), 0);
    }

    /// Polls a future once, without waiting.
    async fn futures_poll_once<F: std::future::Future + Unpin>(f: F) -> Option<F::Output> {
        let mut f = f;
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut f).poll(cx) {
                std::task::Poll::Ready(v) => Some(v),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }

    #[tokio::test]
    async fn no_limit_means_no_permit() {
        let limiter = Limiter::new(0, 0);
        assert!(limiter.acquire(Instant::now()).await.unwrap().is_none());
    }
}
