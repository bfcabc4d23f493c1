//! `cargo run -p forgemq-examples --bin registration [-- --redis URL --hour 2s --listen 127.0.0.1:3000]`
//!
//! Serves `POST /register`; try
//! `curl -s -XPOST localhost:3000/register -H 'content-type: application/json' -d '{"username":"john","email":"john@example.com"}'`
//! and watch the worker send the welcome, then the gift one "hour" later. Ctrl-C stops it.

use std::time::Duration;

use forgemq::{Client, Worker};
use forgemq_examples::registration::Registration;
use forgemq_examples::{duration_flag, flag, init_logging, redis_url};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logging();
    let args: Vec<String> = std::env::args().collect();
    let hour = duration_flag(&args, "--hour", Duration::from_secs(2))?;
    let listen = flag(&args, "--listen").unwrap_or_else(|| "127.0.0.1:3000".to_owned());
    let mq = Client::connect(&redis_url(&args)).await?;
    let reg = Registration::new(mq.clone(), hour);
    let worker = reg.subscribe(Worker::builder(mq.clone())).build()?;
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    println!("POST http://{listen}/register {{\"username\": ..., \"email\": ...}}; Ctrl-C to stop");
    let router = reg.router();
    let server = tokio::spawn(async move { axum::serve(listener, router).await });
    worker
        .run_until(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    server.abort();
    Ok(())
}
