//! What handlers return, and how long a failed message waits before its next attempt.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The error a handler returns: retry (the default), retry after a given time, or fatal.
///
/// Any `std::error::Error` converts into a retryable `HandlerError`, so `?` works inside
/// handlers. A fatal error sends the message to the dead-letter queue at once: use it when
/// running again cannot help (a malformed order id, a deleted user).
///
/// # Examples
/// ```
/// use forgemq::HandlerError;
/// use std::time::Duration;
///
/// let e = HandlerError::fatal("order ORD123 does not exist");
/// assert!(e.is_fatal());
/// let e = HandlerError::retry_after("rate limited", Duration::from_secs(30));
/// assert_eq!(e.retry_after_delay(), Some(Duration::from_secs(30)));
/// ```
pub struct HandlerError {
    error: BoxError,
    fatal: bool,
    retry_after: Option<Duration>,
    rate_limited: bool,
}

impl HandlerError {
    /// A failure worth retrying with the subscription's backoff.
    pub fn retry(error: impl Into<BoxError>) -> Self {
        Self {
            error: error.into(),
            fatal: false,
            retry_after: None,
            rate_limited: false,
        }
    }

    /// A failure worth retrying, but not before `delay` (e.g. from a `Retry-After` header).
    pub fn retry_after(error: impl Into<BoxError>, delay: Duration) -> Self {
        Self {
            retry_after: Some(delay),
            ..Self::retry(error)
        }
    }

    /// A remote service said "too many requests" (HTTP 429): the message goes back without
    /// costing an attempt, to run again after `retry_after`, and the topic's rate limit
    /// ([`Client::set_rate_limit`](crate::Client::set_rate_limit)), if it has one, hands
    /// out nothing for that long, to any worker (on a partitioned topic: that message's
    /// partition).
    /// The wait is at least 1 s (a `Retry-After: 0` must not make a hot loop: the message
    /// costs no attempt, so nothing else would stop it).
    pub fn rate_limited(retry_after: Duration) -> Self {
        let retry_after = retry_after.max(Duration::from_secs(1));
        Self {
            retry_after: Some(retry_after),
            rate_limited: true,
            ..Self::retry(format!(
                "rate limited: retry after {}",
                humantime::format_duration(retry_after)
            ))
        }
    }

    /// True for [`HandlerError::rate_limited`].
    pub fn is_rate_limited(&self) -> bool {
        self.rate_limited
    }

    /// A failure that retrying cannot fix: the message goes to the dead-letter queue now.
    pub fn fatal(error: impl Into<BoxError>) -> Self {
        Self {
            fatal: true,
            ..Self::retry(error)
        }
    }

    /// True when the message goes straight to the dead-letter queue.
    pub fn is_fatal(&self) -> bool {
        self.fatal
    }

    /// The delay the handler asked for, if any.
    pub fn retry_after_delay(&self) -> Option<Duration> {
        self.retry_after
    }

    /// The underlying error.
    pub fn error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.error
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for HandlerError {
    fn from(error: E) -> Self {
        Self::retry(error)
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.error, f)?;
        // Include the chain of causes: the dead-letter entry is often all an operator sees.
        let mut source = self.error.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("error", &self.error)
            .field("fatal", &self.fatal)
            .field("retry_after", &self.retry_after)
            .field("rate_limited", &self.rate_limited)
            .finish()
    }
}

/// How long a failed message waits before its next attempt.
///
/// The default is exponential from 1 s, doubling per failure, capped at 1 hour, with
/// jitter so that messages failing together do not come back together.
#[derive(Clone)]
pub struct Backoff(Kind);

#[derive(Clone)]
enum Kind {
    Fixed(Duration),
    Exponential {
        base: Duration,
        max: Duration,
        jitter: bool,
    },
    Custom(Arc<dyn Fn(u32) -> Duration + Send + Sync>),
}

impl Backoff {
    /// The same wait after every failure.
    pub fn fixed(delay: Duration) -> Self {
        Self(Kind::Fixed(delay))
    }

    /// `base`, `2 × base`, `4 × base`, … up to `max`, each with "equal jitter": a random
    /// time between half the step and the whole step, never less.
    pub fn exponential(base: Duration, max: Duration) -> Self {
        Self(Kind::Exponential {
            base,
            max,
            jitter: true,
        })
    }

    /// Turns jitter off for an exponential backoff (exact steps; mostly for tests).
    pub fn without_jitter(self) -> Self {
        match self.0 {
            Kind::Exponential { base, max, .. } => Self(Kind::Exponential {
                base,
                max,
                jitter: false,
            }),
            other => Self(other),
        }
    }

    /// Any function of the number of failures so far (1 after the first failure).
    pub fn custom(f: impl Fn(u32) -> Duration + Send + Sync + 'static) -> Self {
        Self(Kind::Custom(Arc::new(f)))
    }

    /// The wait after the `failures`-th failure (1-based).
    pub fn delay(&self, failures: u32) -> Duration {
        match &self.0 {
            Kind::Fixed(d) => *d,
            Kind::Custom(f) => f(failures),
            Kind::Exponential { base, max, jitter } => {
                let exp = failures.saturating_sub(1).min(32);
                let step = base.saturating_mul(1u32 << exp.min(31)).min(*max);
                if *jitter && !step.is_zero() {
                    let half = step / 2;
                    half + rand::rng().random_range(Duration::ZERO..=step - half)
                } else {
                    step
                }
            }
        }
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::exponential(Duration::from_secs(1), Duration::from_secs(3600))
    }
}

impl fmt::Debug for Backoff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Kind::Fixed(d) => write!(f, "Backoff::fixed({d:?})"),
            Kind::Exponential { base, max, jitter } => {
                write!(
                    f,
                    "Backoff::exponential({base:?}, {max:?}, jitter: {jitter})"
                )
            }
            Kind::Custom(_) => f.write_str("Backoff::custom(..)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponential_doubles_up_to_the_cap_and_jitters_within_the_step() {
        let b = Backoff::exponential(Duration::from_millis(100), Duration::from_secs(1));
        for _ in 0..100 {
            let d = b.delay(3);
            assert!(
                d >= Duration::from_millis(200) && d <= Duration::from_millis(400),
                "{d:?}"
            );
        }
        assert!(b.delay(50) <= Duration::from_secs(1));
        let exact = b.clone().without_jitter();
        assert_eq!(exact.delay(1), Duration::from_millis(100));
        assert_eq!(exact.delay(4), Duration::from_millis(800));
        assert_eq!(exact.delay(5), Duration::from_secs(1));
    }

    #[test]
    fn fixed_and_custom() {
        assert_eq!(
            Backoff::fixed(Duration::from_secs(2)).delay(7),
            Duration::from_secs(2)
        );
        let c = Backoff::custom(|n| Duration::from_secs(u64::from(n) * 10));
        assert_eq!(c.delay(3), Duration::from_secs(30));
    }

    #[test]
    fn any_error_converts_and_keeps_its_causes() {
        let io = std::io::Error::other("disk full");
        let e: HandlerError = io.into();
        assert!(!e.is_fatal());
        assert_eq!(e.to_string(), "disk full");
    }
}
