//! `cargo run -p forgemq-examples --bin file_processing [-- --redis URL]`
//!
//! Uploads an image, a video, a document and a corrupt video; the first three are
//! processed, the corrupt one is retried twice and then dead-lettered.

use std::time::Duration;

use forgemq::{Client, Worker};
use forgemq_examples::file_processing::{Files, TOPIC};
use forgemq_examples::{init_logging, redis_url};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logging();
    let args: Vec<String> = std::env::args().collect();
    let mq = Client::connect(&redis_url(&args)).await?;
    let files = Files::new(mq.clone(), Duration::from_millis(300));
    let worker = files.subscribe(Worker::builder(mq.clone())).build()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(worker.run_until(async {
        let _ = stopped.await;
    }));
    files.upload("F1", "/uploads/cat.png", "image").await?;
    files.upload("F2", "/uploads/talk.mp4", "video").await?;
    files.upload("F3", "/uploads/notes.pdf", "document").await?;
    files.upload("F4", "/uploads/corrupt.mp4", "video").await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let done = ["F1", "F2", "F3", "F4"].iter().all(|f| {
            files
                .record(f)
                .is_some_and(|r| r.status == "processed" || r.status == "failed")
        });
        if done {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "files were not processed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for f in ["F1", "F2", "F3", "F4"] {
        let r = files.record(f).unwrap_or_default();
        println!(
            "{f}: {} after {} attempt(s), steps {:?}",
            r.status, r.attempts, r.steps
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for d in mq.get_dead_letters(TOPIC, 0..10).await? {
        println!("dead letter {}: {}", d.id, d.error.unwrap_or_default());
    }
    let _ = stop.send(());
    running.await??;
    Ok(())
}
