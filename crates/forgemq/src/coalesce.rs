//! Coalesced publishing: concurrent single publishes to one topic share script calls.
//!
//! A web service publishes one message per request, from many tasks at once. Sent one by
//! one, each is its own script call and round trip. Here, while a call for a topic (a
//! partition of one) is in flight, later publishes queue, and the next call takes them
//! all (in arrival order, at most [`MAX_MESSAGES`] and [`MAX_BYTES`]); each caller still
//! gets its own answer. There is no timer: an idle client sends at once, so a lone
//! publish waits for nothing.
//!
//! A publish that finds its topic idle is sent at once by its own caller; publishes that
//! queue meanwhile are sent by a task the lane is then handed to (one per topic while it
//! has work), so a caller that gives up cannot strand the others queued behind it. A
//! caller dropped before its message is taken out of the queue takes its message out; one
//! dropped after gets whatever Redis did (publish is idempotent by id).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::keys::TopicKeys;
use crate::store::{PublishItem, Written};

/// Most messages one coalesced call carries.
pub(crate) const MAX_MESSAGES: usize = 1000;

/// Most bytes of bodies one coalesced call carries.
pub(crate) const MAX_BYTES: usize = 8 * 1024 * 1024;

/// The queues of single publishes waiting for a call, one per topic (or partition).
#[derive(Default)]
pub(crate) struct Coalescer {
    lanes: Mutex<HashMap<String, Arc<Lane>>>,
}

#[derive(Default)]
struct Lane {
    state: Mutex<LaneState>,
}

#[derive(Default)]
struct LaneState {
    queue: VecDeque<Waiting>,
    /// A task is sending this lane's calls.
    sending: bool,
}

struct Waiting {
    item: PublishItem,
    answer: oneshot::Sender<Result<Written>>,
}

impl Coalescer {
    /// The lane of a topic's (or partition's) keys, as a layout of `partitions` names
    /// them: callers that read different layouts do not share calls.
    fn lane(&self, keys: &TopicKeys, partitions: u32) -> Arc<Lane> {
        let name = format!("{}#{partitions}", keys.msg);
        let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded: a process publishing to thousands of topics forgets idle lanes (one
        // that is sending keeps working through its own handle, and stays).
        if lanes.len() >= 4096 && !lanes.contains_key(&name) {
            lanes.retain(|_, lane| Arc::strong_count(lane) > 1);
        }
        Arc::clone(lanes.entry(name).or_default())
    }
}

impl Client {
    /// Publishes one prepared message to one topic's (or partition's) keys, sharing the
    /// script call with whatever else is published there meanwhile.
    pub(crate) async fn write_coalesced(
        &self,
        keys: &TopicKeys,
        partitions: u32,
        item: PublishItem,
    ) -> Result<Written> {
        let lane = self.inner.coalescer.lane(keys, partitions);
        let (answer, answered) = oneshot::channel();
        let alone = {
            let mut state = lane.state.lock().unwrap_or_else(|p| p.into_inner());
            if state.sending {
                state.queue.push_back(Waiting { item, answer });
                None
            } else {
                state.sending = true;
                Some(item)
            }
        };
        let Some(item) = alone else {
            return answered.await.map_err(|_| {
                Error::Protocol("the task sending this publish ended without an answer".into())
            })?;
        };
        // Nobody is sending: this one goes now, from this task (an idle client adds
        // nothing to a publish). Whoever queues meanwhile is sent by a task this hands
        // the lane to, also if this caller is dropped before its answer comes.
        let hand_over = HandOver {
            client: self,
            lane: &lane,
            keys,
            partitions,
        };
        let written = self.write(keys, partitions, &[&item]).await;
        drop(hand_over);
        Ok(written?.pop().unwrap_or(Written::New))
    }
}

/// Passes a lane on when its inline sender is done (or dropped): to a sending task if
/// messages queued meanwhile, else back to idle.
struct HandOver<'a> {
    client: &'a Client,
    lane: &'a Arc<Lane>,
    keys: &'a TopicKeys,
    partitions: u32,
}

impl Drop for HandOver<'_> {
    fn drop(&mut self) {
        let mut state = self.lane.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.queue.is_empty() {
            state.sending = false;
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                drop(state);
                // The guard goes into the task: a task dropped before it ever ran
                // (runtime shutting down) still frees the lane.
                let lane = Sending {
                    lane: Arc::clone(self.lane),
                    ended: false,
                };
                runtime.spawn(send_lane(
                    self.client.clone(),
                    lane,
                    self.keys.clone(),
                    self.partitions,
                ));
            }
            // No runtime left to send from (it is shutting down): the queued callers get
            // an error rather than wait for ever.
            Err(_) => {
                state.queue.clear();
                state.sending = false;
            }
        }
    }
}

/// Sends the lane's queued messages, call after call, until the queue is empty.
async fn send_lane(client: Client, mut lane: Sending, keys: TopicKeys, partitions: u32) {
    loop {
        let batch = {
            let mut state = lane.lane.state.lock().unwrap_or_else(|p| p.into_inner());
            let batch = take_batch(&mut state.queue);
            if batch.is_empty() {
                state.sending = false;
                drop(state);
                lane.ended = true;
                return;
            }
            batch
        };
        let items: Vec<&PublishItem> = batch.iter().map(|w| &w.item).collect();
        match client.write(&keys, partitions, &items).await {
            Ok(written) => {
                for (w, written) in batch.into_iter().zip(written) {
                    let _ = w.answer.send(Ok(written));
                }
            }
            Err(e) => {
                for w in batch {
                    let _ = w.answer.send(Err(e.for_another_caller()));
                }
            }
        }
    }
}

/// A lane handed to a sending task. If the task ends early (a panic, or the runtime
/// dropping it, even before it first ran), this frees the lane: the queued callers get an
/// error instead of waiting for ever, and the next publish finds the lane idle.
struct Sending {
    lane: Arc<Lane>,
    ended: bool,
}

impl Drop for Sending {
    fn drop(&mut self) {
        if !self.ended {
            let mut state = self.lane.state.lock().unwrap_or_else(|p| p.into_inner());
            state.queue.clear();
            state.sending = false;
        }
    }
}

/// The next call's messages, oldest first: at most [`MAX_MESSAGES`] and [`MAX_BYTES`]
/// (always at least one). Messages whose caller is gone are dropped unsent.
fn take_batch(queue: &mut VecDeque<Waiting>) -> Vec<Waiting> {
    let mut batch = Vec::new();
    let mut bytes = 0;
    while let Some(next) = queue.front() {
        if next.answer.is_closed() {
            queue.pop_front();
            continue;
        }
        let size = next.item.body.len();
        if !batch.is_empty() && (batch.len() >= MAX_MESSAGES || bytes + size > MAX_BYTES) {
            break;
        }
        bytes += size;
        batch.extend(queue.pop_front());
    }
    batch
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn waiting(body: usize) -> (Waiting, oneshot::Receiver<Result<Written>>) {
        let (answer, rx) = oneshot::channel();
        let item = PublishItem {
            id: "x".into(),
            delay: Duration::ZERO,
            body: "b".repeat(body),
            unique: None,
            group: None,
        };
        (Waiting { item, answer }, rx)
    }

    #[test]
    fn batches_are_bounded_by_count_and_bytes_and_skip_abandoned_callers() {
        let mut queue = VecDeque::new();
        let mut kept = Vec::new();
        for _ in 0..1500 {
            let (w, rx) = waiting(10);
            queue.push_back(w);
            kept.push(rx);
        }
        assert_eq!(take_batch(&mut queue).len(), MAX_MESSAGES);
        assert_eq!(take_batch(&mut queue).len(), 500);
        assert!(take_batch(&mut queue).is_empty());

        // 3 MiB each: two fit in 8 MiB, the third waits for the next call.
        for _ in 0..3 {
            let (w, rx) = waiting(3 * 1024 * 1024);
            queue.push_back(w);
            kept.push(rx);
        }
        assert_eq!(take_batch(&mut queue).len(), 2);
        assert_eq!(take_batch(&mut queue).len(), 1);
        // One bigger than the byte bound still goes, alone.
        let (w, _rx) = waiting(MAX_BYTES + 1);
        queue.push_back(w);
        assert_eq!(take_batch(&mut queue).len(), 1);

        // A caller that gave up is skipped.
        let (gone, rx) = waiting(10);
        drop(rx);
        let (stays, _rx2) = waiting(10);
        queue.push_back(gone);
        queue.push_back(stays);
        let batch = take_batch(&mut queue);
        assert_eq!(batch.len(), 1);
        assert!(!batch[0].answer.is_closed());
        drop(kept);
    }
}
