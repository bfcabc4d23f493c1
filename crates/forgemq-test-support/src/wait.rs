//! Waiting for something that must eventually happen, with a generous deadline: tests
//! assert behaviour, not speed.

use std::future::Future;
use std::time::{Duration, Instant};

/// Polls `check` every 20 ms until it is true; panics naming `what` if it is still false
/// after `limit`.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out after {limit:?} waiting for: {what}");
}
