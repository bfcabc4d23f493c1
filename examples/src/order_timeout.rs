//! Case 1: order timeout cancellation (案例 1：订单超时取消).
//!
//! Creating an order reserves its stock and publishes three messages: `order.created` now
//! (confirmation SMS, merchant notification), `order.payment.check` 30 minutes later and
//! `order.reminder` 24 hours later. Paying cancels the check and the reminder by id, so
//! neither ever runs. An order still unpaid when its check runs is cancelled, its stock
//! restored and its reminder cancelled. A paid order whose payment bounced is re-opened
//! with a new payment check under the same unique key `payment-check:<order>`: the
//! cancelled check released the key, and a second bounce notice for the same order
//! schedules no second check. A reminder shaped like the seed's
//! (`{"order_id", "type"}`, no `user_id`) is handled without a crash: there is nobody to
//! remind, so it is logged and acknowledged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use forgemq::{
    Client, HandlerError, Message, MessageId, PublishOptions, PublishOutcome, Subscription,
    WorkerBuilder,
};
use serde::Deserialize;
use serde_json::json;

pub const CREATED: &str = "order.created";
pub const PAYMENT_CHECK: &str = "order.payment.check";
pub const REMINDER: &str = "order.reminder";

/// How long an order may stay unpaid, and when the reminder goes out, in "minutes".
const CHECK_AFTER_MINUTES: u32 = 30;
const REMIND_AFTER_MINUTES: u32 = 24 * 60;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Unpaid,
    Paid,
    Cancelled,
}

#[derive(Clone, Debug)]
pub struct Order {
    pub id: String,
    pub user_id: String,
    pub sku: String,
    pub qty: i64,
    pub status: Status,
    /// The delayed messages this order scheduled, to cancel when it is paid.
    pub check: MessageId,
    pub reminder: MessageId,
}

#[derive(Default)]
struct Db {
    orders: HashMap<String, Order>,
    stock: HashMap<String, i64>,
    log: Vec<String>,
    next: u32,
}

/// The order service: a tiny in-memory "database" and the queue.
#[derive(Clone)]
pub struct Shop {
    mq: Client,
    minute: Duration,
    db: Arc<Mutex<Db>>,
}

impl Shop {
    /// `minute` is how long one "minute" of the scenario takes (`60s` for real time).
    pub fn new(mq: Client, minute: Duration) -> Self {
        Self {
            mq,
            minute,
            db: Arc::default(),
        }
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Db> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn add_stock(&self, sku: &str, n: i64) {
        *self.db().stock.entry(sku.to_owned()).or_default() += n;
    }

    pub fn stock(&self, sku: &str) -> i64 {
        self.db().stock.get(sku).copied().unwrap_or(0)
    }

    pub fn order(&self, id: &str) -> Option<Order> {
        self.db().orders.get(id).cloned()
    }

    /// What happened, in order.
    pub fn log(&self) -> Vec<String> {
        self.db().log.clone()
    }

    fn note(&self, line: String) {
        println!("{line}");
        self.db().log.push(line);
    }

    /// Places an order: reserves stock, then publishes `order.created`, the payment check
    /// in 30 minutes and the reminder in 24 hours.
    pub async fn create_order(
        &self,
        user_id: &str,
        sku: &str,
        qty: i64,
        amount: f64,
    ) -> anyhow::Result<String> {
        let id = {
            let mut db = self.db();
            let stock = db.stock.entry(sku.to_owned()).or_default();
            anyhow::ensure!(*stock >= qty, "only {stock} of {sku} left");
            *stock -= qty;
            db.next += 1;
            format!("ORD{:04}", db.next)
        };
        self.mq
            .publish(
                CREATED,
                json!({"order_id": id, "user_id": user_id, "amount": amount}),
            )
            .await?;
        let check = self.schedule_check(&id).await?.id().clone();
        let reminder = self
            .mq
            .publish_with_delay(
                REMINDER,
                json!({"order_id": id, "user_id": user_id, "type": "payment"}),
                self.minute * REMIND_AFTER_MINUTES,
            )
            .await?;
        self.db().orders.insert(
            id.clone(),
            Order {
                id: id.clone(),
                user_id: user_id.to_owned(),
                sku: sku.to_owned(),
                qty,
                status: Status::Unpaid,
                check,
                reminder,
            },
        );
        self.note(format!(
            "{id}: created for {user_id}, {qty} x {sku}, {amount:.2}"
        ));
        Ok(id)
    }

    /// Schedules the payment check of an order, at most one at a time per order: the
    /// unique key is held until that check runs or is cancelled.
    async fn schedule_check(&self, order_id: &str) -> forgemq::Result<PublishOutcome> {
        let delay = self.minute * CHECK_AFTER_MINUTES;
        let options = PublishOptions::new()
            .delay(delay)
            .unique_key(format!("payment-check:{order_id}"), delay * 2);
        self.mq
            .publish_with(PAYMENT_CHECK, json!({"order_id": order_id}), options)
            .await
    }

    /// The payment of a paid order bounced: it is unpaid again, with a new payment check in
    /// 30 minutes. Returns whether a check was scheduled (false: one is already waiting,
    /// e.g. the bank sent the bounce notice twice).
    pub async fn reopen(&self, order_id: &str) -> anyhow::Result<bool> {
        {
            let mut db = self.db();
            let order = db
                .orders
                .get_mut(order_id)
                .ok_or_else(|| anyhow::anyhow!("no order {order_id}"))?;
            anyhow::ensure!(order.status != Status::Cancelled, "{order_id} is cancelled");
            order.status = Status::Unpaid;
        }
        match self.schedule_check(order_id).await? {
            PublishOutcome::Published(check) => {
                if let Some(order) = self.db().orders.get_mut(order_id) {
                    order.check = check;
                }
                self.note(format!(
                    "{order_id}: payment bounced; checking again in {CHECK_AFTER_MINUTES} minutes"
                ));
                Ok(true)
            }
            outcome => {
                self.note(format!(
                    "{order_id}: payment bounced again; check {} already waiting",
                    outcome.id()
                ));
                Ok(false)
            }
        }
    }

    /// Pays an order: its payment check and reminder are cancelled, so they never run.
    pub async fn pay(&self, order_id: &str) -> anyhow::Result<()> {
        let order = {
            let mut db = self.db();
            let order = db
                .orders
                .get_mut(order_id)
                .ok_or_else(|| anyhow::anyhow!("no order {order_id}"))?;
            anyhow::ensure!(
                order.status == Status::Unpaid,
                "{order_id} is {:?}",
                order.status
            );
            order.status = Status::Paid;
            order.clone()
        };
        let check = cancel(&self.mq, PAYMENT_CHECK, &order.check).await?;
        let reminder = cancel(&self.mq, REMINDER, &order.reminder).await?;
        self.note(format!(
            "{order_id}: paid; payment check {check}, reminder {reminder}"
        ));
        Ok(())
    }

    /// The worker's subscriptions for the three topics.
    pub fn subscribe(&self, worker: WorkerBuilder) -> WorkerBuilder {
        let (a, b, c) = (self.clone(), self.clone(), self.clone());
        worker
            .subscribe(CREATED, move |m: Message<Created>| {
                let shop = a.clone();
                async move {
                    shop.note(format!(
                        "{}: confirmation SMS to {}, merchant notified ({:.2})",
                        m.data.order_id, m.data.user_id, m.data.amount
                    ));
                    Ok::<(), HandlerError>(())
                }
            })
            .subscribe_with(
                PAYMENT_CHECK,
                Subscription::new().concurrency(4),
                move |m: Message<Check>| {
                    let shop = b.clone();
                    async move { shop.payment_check(&m.data.order_id).await }
                },
            )
            .subscribe(REMINDER, move |m: Message<Reminder>| {
                let shop = c.clone();
                async move {
                    shop.remind(m.data);
                    Ok::<(), HandlerError>(())
                }
            })
    }

    async fn payment_check(&self, order_id: &str) -> Result<(), HandlerError> {
        let cancelled = {
            let mut db = self.db();
            let Some(order) = db.orders.get_mut(order_id) else {
                // Retrying cannot make an unknown order appear.
                return Err(HandlerError::fatal(format!("no order {order_id}")));
            };
            if order.status != Status::Unpaid {
                None
            } else {
                order.status = Status::Cancelled;
                let order = order.clone();
                *db.stock.entry(order.sku.clone()).or_default() += order.qty;
                Some(order)
            }
        };
        match cancelled {
            None => self.note(format!("{order_id}: payment check: paid, nothing to do")),
            Some(order) => {
                // Nobody needs reminding about a cancelled order.
                cancel(&self.mq, REMINDER, &order.reminder)
                    .await
                    .map_err(HandlerError::retry)?;
                self.note(format!(
                    "{order_id}: unpaid after {CHECK_AFTER_MINUTES} minutes: cancelled, {} x {} back in stock",
                    order.qty, order.sku
                ));
            }
        }
        Ok(())
    }

    fn remind(&self, r: Reminder) {
        match r.user_id {
            // The seed's reminder has no user_id (its handler crashed on it).
            None => self.note(format!(
                "{}: {} reminder without a user_id: nobody to remind, acknowledged",
                r.order_id,
                r.kind.as_deref().unwrap_or("a")
            )),
            Some(user) => {
                let status = self.order(&r.order_id).map(|o| o.status);
                if status == Some(Status::Unpaid) {
                    self.note(format!("{}: payment reminder sent to {user}", r.order_id));
                } else {
                    self.note(format!("{}: reminder skipped ({status:?})", r.order_id));
                }
            }
        }
    }
}

/// Cancels a scheduled message; one that already ran (or is running) is not an error
/// here, a Redis failure is.
async fn cancel(mq: &Client, topic: &str, id: &MessageId) -> forgemq::Result<String> {
    match mq.cancel(topic, id).await {
        Ok(state) => Ok(format!("cancelled ({state:?})")),
        Err(e @ (forgemq::Error::NotFound { .. } | forgemq::Error::NotCancellable { .. })) => {
            Ok(format!("not cancelled: {e}"))
        }
        Err(e) => Err(e),
    }
}

/// `order.created`.
#[derive(Debug, Deserialize)]
pub struct Created {
    pub order_id: String,
    pub user_id: String,
    pub amount: f64,
}

/// `order.payment.check`.
#[derive(Debug, Deserialize)]
pub struct Check {
    pub order_id: String,
}

/// `order.reminder`: the seed publishes it without a `user_id`.
#[derive(Debug, Deserialize)]
pub struct Reminder {
    pub order_id: String,
    pub user_id: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
}
