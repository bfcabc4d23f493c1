//! `cargo run -p forgemq-examples --bin data_sync [-- --redis URL]`
//!
//! A user update with nested data reaches the cache, the search index and the warehouse;
//! publishing the same change again is recognised and syncs nothing; an unknown action is
//! ignored.

use std::time::Duration;

use forgemq::{Client, Worker};
use forgemq_examples::data_sync::UserSync;
use forgemq_examples::{init_logging, redis_url};
use serde_json::json;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logging();
    let args: Vec<String> = std::env::args().collect();
    let mq = Client::connect(&redis_url(&args)).await?;
    let sync = UserSync::new(mq.clone());
    let worker = sync.subscribe(Worker::builder(mq.clone())).build()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(worker.run_until(async {
        let _ = stopped.await;
    }));
    // A run id keeps the change ids of repeated demo runs apart.
    let run = std::process::id();
    let data =
        json!({"name": "John", "address": {"city": "Hangzhou", "tags": ["vip", 3]}, "score": 99.5});
    let user = format!("u{run}");
    println!(
        "update published: {}",
        sync.update_user(&user, "c1", data.clone()).await?
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!(
        "same change published again (new?): {}",
        sync.update_user(&user, "c1", data).await?
    );
    sync.publish(&user, "c2", "archive", json!({})).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sinks = sync.sinks();
    println!(
        "cache: {}",
        sinks.cache.get(&user).cloned().unwrap_or_default()
    );
    println!(
        "syncs of {user}: {}",
        sinks.syncs.get(&user).copied().unwrap_or(0)
    );
    println!("ignored actions: {:?}", sinks.ignored);
    let _ = stop.send(());
    running.await??;
    Ok(())
}
