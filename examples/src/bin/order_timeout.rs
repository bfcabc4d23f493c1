//! `cargo run -p forgemq-examples --bin order_timeout [-- --redis URL --minute 100ms]`
//!
//! Two orders: one is paid (its payment check and reminder are cancelled), one is not (its
//! check cancels it after 30 "minutes" and restores the stock), plus a reminder shaped like
//! the seed's, without a user_id.

use std::time::Duration;

use forgemq::{Client, Worker};
use forgemq_examples::order_timeout::{Shop, Status, REMINDER};
use forgemq_examples::{duration_flag, init_logging, redis_url};
use serde_json::json;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logging();
    let args: Vec<String> = std::env::args().collect();
    let minute = duration_flag(&args, "--minute", Duration::from_millis(100))?;
    let mq = Client::connect(&redis_url(&args)).await?;
    let shop = Shop::new(mq.clone(), minute);
    shop.add_stock("SKU-1", 10);
    let worker = shop.subscribe(Worker::builder(mq.clone())).build()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(worker.run_until(async {
        let _ = stopped.await;
    }));

    let paid = shop.create_order("u1", "SKU-1", 2, 299.99).await?;
    let unpaid = shop.create_order("u2", "SKU-1", 3, 99.5).await?;
    println!("stock after two orders: {}", shop.stock("SKU-1"));
    shop.pay(&paid).await?;
    // The seed's reminder: no user_id.
    mq.publish(REMINDER, json!({"order_id": unpaid, "type": "payment"}))
        .await?;

    println!(
        "waiting {:?} (30 \"minutes\") for the payment checks...",
        minute * 30
    );
    let deadline = tokio::time::Instant::now() + minute * 30 + Duration::from_secs(10);
    while shop.order(&unpaid).map(|o| o.status) != Some(Status::Cancelled) {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the payment check did not run"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "stock after the unpaid order was cancelled: {}",
        shop.stock("SKU-1")
    );
    let _ = stop.send(());
    running.await??;
    Ok(())
}
