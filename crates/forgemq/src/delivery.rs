//! Manual fetch: take messages without a worker and settle each one yourself.

use std::time::Duration;

use serde_json::Value;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::handler::Backoff;
use crate::keys::TopicKeys;
use crate::message::{Envelope, LeaseState, Message, MessageId};
use crate::store::{SettleCall, SettleOp};
use crate::worker::failure_op;

/// Lease of a manually fetched message: as a worker's default, and renewable with
/// [`Delivery::extend`].
pub const DEFAULT_POP_LEASE: Duration = Duration::from_secs(15);

/// Retries allowed when neither the message nor the caller says otherwise.
const DEFAULT_MAX_RETRY: u32 = 3;

/// A leased message taken with [`Client::pop_message`].
///
/// Settle it with [`ack`](Delivery::ack), [`nack`](Delivery::nack) or
/// [`dead`](Delivery::dead). Dropping it unsettled is safe: the lease expires and the
/// message is handed out again.
#[derive(Debug)]
pub struct Delivery {
    client: Client,
    keys: TopicKeys,
    token: String,
    body: Vec<u8>,
    message: Message<Value>,
}

impl Delivery {
    /// The message.
    pub fn message(&self) -> &Message<Value> {
        &self.message
    }

    /// The message id.
    pub fn id(&self) -> &MessageId {
        &self.message.id
    }

    /// The message data.
    pub fn data(&self) -> &Value {
        &self.message.data
    }

    fn lost(&self) -> Error {
        Error::LeaseLost {
            topic: self.keys.topic.clone(),
            id: self.message.id.to_string(),
        }
    }

    async fn settle(&self, op: SettleOp) -> Result<()> {
        let outcome = [(
            self.token.as_str(),
            self.message.id.as_str().as_bytes(),
            &op,
        )];
        // A transient failure is retried as the same call: what an attempt whose reply was
        // lost applied is answered as applied, not as a lost lease.
        let first = SettleCall::new();
        let mut call = first.clone();
        let mut attempt = 1;
        let flags = loop {
            match self
                .client
                .store()
                .settle(&self.keys, &outcome, Duration::ZERO, None, &call)
                .await
            {
                Err(e) if e.is_transient() && attempt < 3 => {
                    tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
                    attempt += 1;
                    call = first.again();
                }
                other => break other?,
            }
        };
        if flags.first().copied().unwrap_or(false) {
            Ok(())
        } else {
            Err(self.lost())
        }
    }

    /// Done: the message is removed. [`Error::LeaseLost`] if the lease expired and the
    /// message was handed to someone else meanwhile.
    pub async fn ack(self) -> Result<()> {
        let retry = self.message.retry;
        self.settle(SettleOp::Ack {
            retry,
            result: None,
        })
        .await
    }

    /// Done, with a result kept in the message's record (see
    /// [`Client::message_status`](crate::Client::message_status)); otherwise as
    /// [`Delivery::ack`].
    pub async fn ack_with<R: serde::Serialize + Send + 'static>(self, result: R) -> Result<()> {
        use crate::status::HandlerOutput;
        let retry = self.message.retry;
        self.settle(SettleOp::Ack {
            retry,
            result: crate::status::Done(result).record_members(),
        })
        .await
    }

    /// Failed with `error`: counts an attempt and runs it again after `retry_after`, or
    /// dead-letters it when its retries are used up.
    pub async fn nack(self, retry_after: Duration, error: &str) -> Result<()> {
        let op = self.failure(error, false, Some(retry_after));
        self.settle(op).await
    }

    /// Failed for good: straight to the dead-letter queue with `reason`.
    pub async fn dead(self, reason: &str) -> Result<()> {
        let op = self.failure(reason, true, None);
        self.settle(op).await
    }

    fn failure(&self, error: &str, fatal: bool, after: Option<Duration>) -> SettleOp {
        failure_op(
            &self.body,
            &self.keys.topic,
            self.message.id.as_str(),
            error,
            fatal,
            after,
            DEFAULT_MAX_RETRY,
            &Backoff::default(),
        )
    }

    /// Renews the lease for `lease` from now (Redis clock).
    pub async fn extend(&self, lease: Duration) -> Result<()> {
        let pair = [(self.token.clone(), self.message.id.to_string())];
        let flags = self.client.store().extend(&self.keys, lease, &pair).await?;
        if flags.first().copied().unwrap_or(false) {
            Ok(())
        } else {
            self.message.lease.mark_lost();
            Err(self.lost())
        }
    }
}

impl Client {
    /// Takes the next waiting message of `topic` without blocking (the seed's
    /// `PopMessage`); `None` when nothing is waiting.
    pub async fn pop_message(&self, topic: &str) -> Result<Option<Delivery>> {
        Ok(self.pop_messages(topic, 1).await?.pop())
    }

    /// Takes up to `n` waiting messages (at most 1,000) in one round trip, each leased for
    /// [`DEFAULT_POP_LEASE`].
    pub async fn pop_messages(&self, topic: &str, n: usize) -> Result<Vec<Delivery>> {
        self.pop_messages_with_lease(topic, n, DEFAULT_POP_LEASE)
            .await
    }

    /// As [`Client::pop_messages`], with a chosen lease.
    pub async fn pop_messages_with_lease(
        &self,
        topic: &str,
        n: usize,
        lease: Duration,
    ) -> Result<Vec<Delivery>> {
        let layout = self.layout(topic).await?;
        if n == 0 {
            return Ok(Vec::new());
        }
        if lease < Duration::from_millis(1) {
            return Err(Error::Config("lease must be at least 1ms".into()));
        }
        let n = n.min(crate::store::MAX_PER_CALL);
        // The partitions of a partitioned topic take turns at being asked first.
        let parts = layout.partitions.len();
        let start = self
            .inner
            .pop_turn
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut out = Vec::new();
        let mut failure = None;
        for i in 0..parts {
            if out.len() >= n {
                break;
            }
            let keys = &layout.partitions[(start + i) % parts];
            match self.pop_from(keys, topic, n - out.len(), lease).await {
                Ok(got) => out.extend(got),
                // Deliveries already leased from other partitions are returned rather than
                // dropped (they would wait out their lease); the next partition may answer.
                Err(e) => {
                    tracing::warn!(topic, error = %e, "a partition could not be fetched from");
                    failure.get_or_insert(e);
                }
            }
        }
        match failure {
            Some(e) if out.is_empty() => Err(e),
            _ => Ok(out),
        }
    }

    async fn pop_from(
        &self,
        keys: &TopicKeys,
        topic: &str,
        n: usize,
        lease: Duration,
    ) -> Result<Vec<Delivery>> {
        let store = self.store();
        // Without a worker on this topic nobody else returns expired leases.
        store.recover(keys, self.inner.max_recoveries, 1000).await?;
        let token = crate::worker::lease_token(&crate::registry::pop_holder());
        let fetched = store.fetch(keys, n, lease, &token, false, false).await?;
        // The token the script stored: the given one and when it ran.
        let token = fetched.token;
        let mut out = Vec::with_capacity(fetched.messages.len());
        for m in fetched.messages {
            let limit = crate::message::stored_limit(self.max_payload());
            if m.body.len() > limit {
                let op = SettleOp::DeadAsIs {
                    error: format!(
                        "stored body of {} bytes is over the {limit}-byte limit for stored messages (the {}-byte payload limit plus room for a failure history)",
                        m.body.len(),
                        self.max_payload()
                    ),
                };
                store
                    .settle(
                        keys,
                        &[(&token, m.id.as_bytes(), &op)],
                        Duration::ZERO,
                        None,
                        &SettleCall::new(),
                    )
                    .await?;
                continue;
            }
            match Envelope::decode(&m.body) {
                Ok(env) => {
                    let message = Message {
                        id: MessageId::from_stored(m.id),
                        topic: topic.to_owned(),
                        timestamp: env.timestamp(),
                        retry: env.retry,
                        max_retry: env.max_retry.unwrap_or(DEFAULT_MAX_RETRY),
                        recoveries: env.recoveries,
                        headers: env.headers,
                        group: env.group,
                        data: env.data,
                        lease: std::sync::Arc::new(LeaseState::new(
                            std::sync::Arc::new(keys.clone()),
                            std::sync::Arc::from(token.as_str()),
                        )),
                        client: self.clone(),
                    };
                    out.push(Delivery {
                        client: self.clone(),
                        keys: keys.clone(),
                        token: token.clone(),
                        body: m.body,
                        message,
                    });
                }
                Err(e) => {
                    let error = format!("envelope does not decode: {e}");
                    let op = failure_op(
                        &m.body,
                        topic,
                        &m.id,
                        &error,
                        true,
                        None,
                        0,
                        &Backoff::default(),
                    );
                    store
                        .settle(
                            keys,
                            &[(&token, m.id.as_bytes(), &op)],
                            Duration::ZERO,
                            None,
                            &SettleCall::new(),
                        )
                        .await?;
                }
            }
        }
        Ok(out)
    }
}
