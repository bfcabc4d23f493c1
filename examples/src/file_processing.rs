//! Case 2: file processing (案例 2：文件处理).
//!
//! An upload is saved and `file.process` `{file_id, file_path, file_type}` is published.
//! The worker makes a thumbnail and compresses an image, transcodes a video and makes its
//! preview, and leaves other files as they are; then the file's status becomes
//! `processed`. A transcode that fails (here: any path containing "corrupt") is retried
//! with backoff and, after its last attempt, the message goes to the dead-letter queue
//! with the error and the file's status becomes `failed`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use forgemq::{Backoff, Client, HandlerError, Message, MessageId, Subscription, WorkerBuilder};
use serde::{Deserialize, Serialize};

pub const TOPIC: &str = "file.process";

/// Retries of a failing file before the dead-letter queue.
pub const MAX_RETRY: u32 = 2;

/// The message, as the seed publishes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileJob {
    pub file_id: String,
    pub file_path: String,
    pub file_type: String,
}

/// What the "database" knows of a file.
#[derive(Debug, Clone, Default)]
pub struct FileRecord {
    pub status: String,
    /// The processing steps done, in order (a retried step appears again).
    pub steps: Vec<String>,
    pub attempts: u32,
}

/// The file service: uploads, and the worker's handler.
#[derive(Clone)]
pub struct Files {
    mq: Client,
    backoff: Duration,
    db: Arc<Mutex<HashMap<String, FileRecord>>>,
}

impl Files {
    /// `backoff` is the delay between attempts of a failing file.
    pub fn new(mq: Client, backoff: Duration) -> Self {
        Self {
            mq,
            backoff,
            db: Arc::default(),
        }
    }

    fn db(&self) -> std::sync::MutexGuard<'_, HashMap<String, FileRecord>> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn record(&self, file_id: &str) -> Option<FileRecord> {
        self.db().get(file_id).cloned()
    }

    /// Saves the upload (here: records it) and publishes `file.process`; the message id.
    pub async fn upload(
        &self,
        file_id: &str,
        file_path: &str,
        file_type: &str,
    ) -> anyhow::Result<MessageId> {
        self.db().insert(
            file_id.to_owned(),
            FileRecord {
                status: "uploaded".to_owned(),
                ..FileRecord::default()
            },
        );
        let job = FileJob {
            file_id: file_id.to_owned(),
            file_path: file_path.to_owned(),
            file_type: file_type.to_owned(),
        };
        let id = self.mq.publish(TOPIC, &job).await?;
        println!("{file_id}: uploaded ({file_type}, {file_path})");
        Ok(id)
    }

    pub fn subscribe(&self, worker: WorkerBuilder) -> WorkerBuilder {
        let files = self.clone();
        worker.subscribe_with(
            TOPIC,
            Subscription::new()
                .concurrency(4)
                .max_retry(MAX_RETRY)
                .backoff(Backoff::fixed(self.backoff)),
            move |m: Message<FileJob>| {
                let files = files.clone();
                async move { files.process(m).await }
            },
        )
    }

    async fn process(&self, m: Message<FileJob>) -> Result<(), HandlerError> {
        let job = &m.data;
        self.update(&job.file_id, |r| {
            r.status = "processing".to_owned();
            r.attempts += 1;
        });
        let steps: &[&str] = match job.file_type.as_str() {
            "image" => &["thumbnail", "compress"],
            "video" => &["transcode", "preview"],
            _ => &[],
        };
        for step in steps {
            if let Err(e) = run_step(step, &job.file_path).await {
                if m.is_last_attempt() {
                    self.update(&job.file_id, |r| r.status = "failed".to_owned());
                    println!("{}: {step} failed for good: {e}", job.file_id);
                } else {
                    println!(
                        "{}: {step} failed (attempt {}), will retry: {e}",
                        job.file_id,
                        m.retry + 1
                    );
                }
                return Err(HandlerError::retry(e));
            }
            self.update(&job.file_id, |r| r.steps.push((*step).to_owned()));
        }
        self.update(&job.file_id, |r| r.status = "processed".to_owned());
        println!("{}: processed ({})", job.file_id, steps.join(", "));
        Ok(())
    }

    fn update(&self, file_id: &str, f: impl FnOnce(&mut FileRecord)) {
        f(self.db().entry(file_id.to_owned()).or_default());
    }
}

/// One processing step; a "corrupt" file cannot be transcoded.
async fn run_step(step: &str, path: &str) -> Result<(), String> {
    tokio::time::sleep(Duration::from_millis(5)).await;
    if step == "transcode" && path.contains("corrupt") {
        return Err(format!(
            "transcode of {path}: invalid data found when processing input"
        ));
    }
    Ok(())
}
