//! Global rate limits per topic: a token bucket in the topic's slot, applied by the fetch
//! script, so every worker of every process shares it and it changes at run time.
//!
//! The limit counts deliveries (starts of a handler), which is what a remote API's quota
//! counts. Over any window of length T at most `rate·T + burst` messages start: a bucket
//! has no window edge to burst across. Idle workers of a limited topic sleep until the next
//! token is due (the fetch says when), they do not poll.

use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::keys::validate_topic;

/// Highest rate accepted, per second.
const MAX_RATE: f64 = 1_000_000.0;

/// Largest burst accepted.
const MAX_BURST: u32 = 1_000_000;

/// A rate limit: `count` deliveries per period, with a burst.
///
/// # Examples
/// ```
/// use forgemq::RateLimit;
/// use std::time::Duration;
///
/// let limit: RateLimit = "100/s".parse().unwrap();
/// assert_eq!(limit.per_second(), 100.0);
/// let quota = RateLimit::new(6000, Duration::from_secs(60)).burst(20);
/// assert_eq!((quota.per_second(), quota.burst_size()), (100.0, 20));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    per_second: f64,
    burst: u32,
}

impl RateLimit {
    /// `count` deliveries per `period`; the burst defaults to a tenth of a second's worth
    /// (at least 1).
    pub fn new(count: u32, period: Duration) -> Self {
        let per_second = f64::from(count) / period.as_secs_f64().max(1e-9);
        Self {
            per_second,
            burst: default_burst(per_second),
        }
    }

    /// How many may start at once after a quiet spell (the bucket's size).
    #[must_use]
    pub fn burst(mut self, burst: u32) -> Self {
        self.burst = burst;
        self
    }

    /// Deliveries per second.
    pub fn per_second(&self) -> f64 {
        self.per_second
    }

    /// The burst.
    pub fn burst_size(&self) -> u32 {
        self.burst
    }

    fn check(&self) -> Result<()> {
        if !(self.per_second > 0.0 && self.per_second <= MAX_RATE) {
            return Err(Error::Config(format!(
                "a rate limit must be above 0 and at most {MAX_RATE}/s, not {}/s",
                self.per_second
            )));
        }
        if self.burst == 0 || self.burst > MAX_BURST {
            return Err(Error::Config(format!(
                "burst must be 1 to {MAX_BURST}, not {}",
                self.burst
            )));
        }
        Ok(())
    }
}

fn default_burst(per_second: f64) -> u32 {
    (per_second / 10.0).ceil().clamp(1.0, f64::from(MAX_BURST)) as u32
}

impl std::fmt::Display for RateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = self.per_second;
        if r >= 1.0 || r == 0.0 {
            write!(f, "{}/s", trim(r))
        } else if r * 60.0 >= 1.0 {
            write!(f, "{}/m", trim(r * 60.0))
        } else {
            write!(f, "{}/h", trim(r * 3600.0))
        }
    }
}

fn trim(x: f64) -> String {
    let s = format!("{x:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

impl FromStr for RateLimit {
    type Err = Error;

    /// `COUNT/UNIT` with UNIT `s`, `m` or `h`, or a duration (`100/10s`, `5/500ms`).
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::Config(format!(
                "rate {s:?}: give COUNT/PERIOD, e.g. 100/s, 6000/m, 10/h or 5/500ms"
            ))
        };
        let (count, period) = s.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        let period = match period.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            other => humantime::parse_duration(other).map_err(|_| bad())?,
        };
        if period.is_zero() || count == 0 {
            return Err(bad());
        }
        let limit = RateLimit::new(count, period);
        limit.check()?;
        Ok(limit)
    }
}

/// A topic and its rate limit, as [`Client::rate_limits`] lists them.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct TopicLimit {
    /// The topic.
    pub topic: String,
    /// The limit in the form `100/s` (or `/m`, `/h` for slow ones).
    pub rate: String,
    /// Deliveries per second.
    pub per_second: f64,
    /// The burst.
    pub burst: u32,
}

impl Client {
    /// Limits how many messages of `topic` start per unit of time, across every worker of
    /// every process, at once and until changed or removed. On a partitioned topic each of
    /// its N partitions gets `rate/N` and `burst/N` (at least 1): exact on a plain topic.
    pub async fn set_rate_limit(&self, topic: &str, limit: RateLimit) -> Result<()> {
        validate_topic(topic)?;
        limit.check()?;
        let layout = self.fresh_layout(topic).await?;
        let n = layout.count();
        let per = (
            limit.per_second / f64::from(n),
            limit.burst.div_ceil(n).max(1),
        );
        for keys in &layout.partitions {
            self.store().set_limit(keys, Some(per)).await?;
        }
        self.register(topic).await
    }

    /// Removes the rate limit of `topic`; whether it had one.
    pub async fn remove_rate_limit(&self, topic: &str) -> Result<bool> {
        let had = self.rate_limit(topic).await?.is_some();
        let layout = self.fresh_layout(topic).await?;
        for keys in &layout.partitions {
            self.store().set_limit(keys, None).await?;
        }
        Ok(had)
    }

    /// The rate limit of `topic` (summed over its partitions), if it has one.
    pub async fn rate_limit(&self, topic: &str) -> Result<Option<RateLimit>> {
        validate_topic(topic)?;
        let layout = self.layout(topic).await?;
        let mut total: Option<RateLimit> = None;
        for keys in &layout.partitions {
            if let Some((rate, burst)) = self.store().limit(keys).await? {
                let t = total.get_or_insert(RateLimit {
                    per_second: 0.0,
                    burst: 0,
                });
                t.per_second += rate;
                t.burst += burst;
            }
        }
        Ok(total)
    }

    /// Every topic that has a rate limit, sorted by name.
    pub async fn rate_limits(&self) -> Result<Vec<TopicLimit>> {
        let mut out = Vec::new();
        for topic in self.topics().await? {
            if let Some(limit) = self.rate_limit(&topic).await? {
                out.push(TopicLimit {
                    topic,
                    rate: limit.to_string(),
                    per_second: limit.per_second,
                    burst: limit.burst,
                });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_and_print() {
        let r: RateLimit = "100/s".parse().unwrap();
        assert_eq!((r.per_second(), r.burst_size()), (100.0, 10));
        assert_eq!(r.to_string(), "100/s");
        let r: RateLimit = "6000/m".parse().unwrap();
        assert_eq!(r.per_second(), 100.0);
        let r: RateLimit = "30/h".parse().unwrap();
        assert_eq!(r.to_string(), "30/h");
        assert_eq!(r.burst_size(), 1);
        let r: RateLimit = "5/500ms".parse().unwrap();
        assert_eq!(r.per_second(), 10.0);
        assert_eq!("1/m".parse::<RateLimit>().unwrap().to_string(), "1/m");
        for bad in [
            "",
            "100",
            "x/s",
            "0/s",
            "5/0s",
            "-1/s",
            "10/fortnight",
            "9999999/s",
        ] {
            assert!(bad.parse::<RateLimit>().is_err(), "{bad:?}");
        }
        assert!(RateLimit::new(10, Duration::from_secs(1))
            .burst(0)
            .check()
            .is_err());
    }
}
