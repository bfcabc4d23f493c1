//! Publishes a few welcome emails, consumes them, retries one that fails once and
//! dead-letters one that always fails; then prints the queue's stats and dead letters.
//!
//! `REDIS_URL=redis://127.0.0.1:6379 cargo run -p forgemq --example quickstart`
//! (or `scripts/demo.sh`, which starts a private Redis when none is given).

use std::time::Duration;

use forgemq::{Backoff, Client, HandlerError, Message, Subscription, Worker};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Welcome {
    user_id: String,
    email: String,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "forgemq=info".into()),
        )
        .init();
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    // A namespace of its own, so the demo never touches anyone's real queues.
    let mq = Client::builder(&url).namespace("demo").build().await?;
    let topic = "user.welcome";
    mq.purge_queue(topic).await?;

    for (user, email) in [
        ("1", "ann@example.com"),
        ("2", "flaky@example.com"),
        ("3", "bounce@example.com"),
    ] {
        let id = mq
            .publish(
                topic,
                Welcome {
                    user_id: user.into(),
                    email: email.into(),
                },
            )
            .await?;
        println!("published {id} for {email}");
    }
    let later = mq
        .publish_with_delay(
            topic,
            Welcome {
                user_id: "4".into(),
                email: "later@example.com".into(),
            },
            Duration::from_secs(1),
        )
        .await?;
    println!("published {later} for later@example.com, due in 1 s");

    let subscription = Subscription::new()
        .concurrency(4)
        .max_retry(2)
        .backoff(Backoff::fixed(Duration::from_millis(300)));
    let worker = Worker::builder(mq.clone())
        .subscribe_with(topic, subscription, |msg: Message<Welcome>| async move {
            match msg.data.email.as_str() {
                "flaky@example.com" if msg.retry == 0 => {
                    Err(HandlerError::retry("SMTP timeout (first attempt only)"))
                }
                "bounce@example.com" => Err(HandlerError::retry("550 mailbox unavailable")),
                email => {
                    println!("sent welcome to {email} (attempt {})", msg.retry + 1);
                    Ok(())
                }
            }
        })
        .build()?;

    // Stop once everything is either processed or dead.
    let watcher = mq.clone();
    worker
        .run_until(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if let Ok(s) = watcher.stats(topic).await {
                    if s.processed + s.dead >= 4 && s.pending + s.active + s.delayed == 0 {
                        break;
                    }
                }
            }
        })
        .await?;

    let stats = mq.stats(topic).await?;
    println!(
        "\n{topic}: pending {} active {} delayed {} dead {} | processed {} failed {} retried {}",
        stats.pending,
        stats.active,
        stats.delayed,
        stats.dead,
        stats.processed,
        stats.failed,
        stats.retried
    );
    for dead in mq.get_dead_letters(topic, 0..10).await? {
        println!(
            "dead letter {} after {} failures: {}",
            dead.id,
            dead.retry,
            dead.error.unwrap_or_default()
        );
    }
    Ok(())
}
