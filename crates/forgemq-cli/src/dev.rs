//! `forgemq dev`: a working queue on one machine with no configuration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A redis-server child, stopped (with SIGTERM, so the AOF is flushed) when dropped.
struct PrivateRedis {
    child: Child,
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `serve` against `redis`, or against a private redis-server started here.
pub(crate) async fn run(
    redis: Option<&str>,
    namespace: &str,
    bind: SocketAddr,
    options: crate::serve::Options,
) -> Result<()> {
    let (url, _guard) = match redis {
        Some(url) => (url.to_owned(), None),
        None => {
            let (url, guard) = start_private_redis()?;
            (url, Some(guard))
        }
    };
    let mq = crate::connect_to(&url, namespace).await?;
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "forgemq".to_owned());
    // What a newcomer needs: where to look, and one line to paste to see it move.
    println!("ForgeMQ is running.");
    println!("  dashboard:  http://{bind}/");
    println!("  API:        http://{bind}/api/v1  (OpenAPI: /api/v1/openapi.json)");
    println!("  Redis:      {}", crate::redact(&url));
    println!("Publish a message from another terminal and watch the topic appear:");
    println!(
        "  {exe} --redis {} publish user.welcome '{{\"user_id\":\"123\",\"email\":\"john@example.com\"}}'",
        crate::redact(&url)
    );
    println!("Stop with Ctrl-C.");
    let listener = crate::serve::bind(bind).await?;
    crate::serve::serve(mq, listener, options).await
}

fn start_private_redis() -> Result<(String, PrivateRedis)> {
    let dir = PathBuf::from(".forgemq");
    std::fs::create_dir_all(&dir).with_context(|| format!("could not create {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--appendonly", "yes"])
        .args(["--appendfsync", "always", "--save", "", "--maxmemory-policy", "noeviction"])
        .arg("--dir")
        .arg(&dir)
        .arg("--logfile")
        .arg(dir.join("redis.log"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| {
            anyhow::anyhow!(
                "could not start redis-server ({e}); install it (Debian/Ubuntu: sudo apt-get install -y redis-server) or pass --redis URL"
            )
        })?;
    let guard = PrivateRedis { child };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "redis-server did not start within 10 s; see {}",
                dir.join("redis.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "forgemq dev: started a private redis-server on port {port} (AOF always, data in {})",
        dir.display()
    );
    Ok((format!("redis://127.0.0.1:{port}/"), guard))
}
