//! `cargo run -p forgemq-examples --bin gateway_receiver [-- --listen 127.0.0.1:9000]`:
//! the receiver of the gateway demo (examples/gateway/README.md).

use forgemq_examples::{flag, gateway_receiver};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let listen = flag(&args, "--listen").unwrap_or_else(|| "127.0.0.1:9000".to_owned());
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    println!(
        "receiver listening on http://{listen}/<route> (a message with \"fail\": true gets a 500)"
    );
    axum::serve(listener, gateway_receiver::router(Default::default())).await?;
    Ok(())
}
