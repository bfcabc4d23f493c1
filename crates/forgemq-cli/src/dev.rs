//! `forgemq dev`: a working queue on one machine with no configuration.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// A redis-server child, stopped (with SIGTERM, so the AOF is flushed) when dropped,
/// and the lock on its data folder, released after it stopped.
struct PrivateRedis {
    child: Child,
    _lock: DataLock,
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

/// An exclusive lock on `./.forgemq/` (flock on `.forgemq/lock`, which holds the pid of
/// its owner): two redis-servers appending to one AOF would corrupt it. The kernel
/// drops the lock when the process ends, however it ends, so a crash leaves no stale lock.
struct DataLock {
    _file: Flock<File>,
}

impl DataLock {
    fn take(dir: &Path) -> Result<DataLock> {
        let path = dir.join("lock");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("could not open {}", path.display()))?;
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((mut file, Errno::EWOULDBLOCK)) => {
                let mut owner = String::new();
                let _ = file.read_to_string(&mut owner);
                let owner = match owner.trim() {
                    "" => String::new(),
                    pid => format!(" (pid {pid})"),
                };
                bail!(
                    "another forgemq dev{owner} is already running in this folder and owns {}: \
                     two redis-servers would append to the same AOF. Use that one, stop it first, \
                     or run this one from another folder or with --redis URL",
                    dir.display()
                );
            }
            Err((_, e)) => bail!("could not lock {}: {e}", path.display()),
        };
        file.set_len(0)?;
        file.write_all(format!("{}\n", std::process::id()).as_bytes())?;
        Ok(DataLock { _file: file })
    }
}

/// Stops the redis-server a killed `forgemq dev` left running on `dir`, if any: the pid in
/// `dir/redis.pid` when that process is a redis-server working in `dir`.
fn stop_leftover_redis(dir: &Path) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(dir.join("redis.pid")) else {
        return Ok(());
    };
    let Ok(pid) = text.trim().parse::<i32>() else {
        return Ok(());
    };
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let is_ours = std::fs::read_to_string(proc_dir.join("comm"))
        .is_ok_and(|comm| comm.trim().starts_with("redis-server"))
        && std::fs::read_link(proc_dir.join("cwd")).is_ok_and(|cwd| cwd == dir);
    if !is_ours {
        return Ok(());
    }
    crate::logging::say(&format!(
        "forgemq dev: stopping the redis-server (pid {pid}) that a killed forgemq dev left running on {}",
        dir.display()
    ));
    let pid = nix::unistd::Pid::from_raw(pid);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    while proc_dir.exists() {
        if Instant::now() > deadline {
            bail!(
                "the redis-server (pid {pid}) left running on {} did not stop within 10 s of SIGTERM; stop it, then start forgemq dev again",
                dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Runs `serve` against `redis`, or against a private redis-server started here.
///
/// The port is taken first, then the data folder, then redis-server is started, and only
/// then is anything announced: a second `dev` fails before it starts a second Redis on
/// the same data or prints a dashboard URL that is not its own.
pub(crate) async fn run(
    redis: Option<&str>,
    connect: &crate::ConnectOptions,
    bind: SocketAddr,
    options: crate::serve::Options,
) -> Result<()> {
    options.check(bind)?;
    if redis.is_none() && connect.replicas > 0 {
        // The private redis-server has no replicas: every publish would fail.
        return Err(crate::UsageError(format!(
            "--replicas {} needs a Redis with replicas, and the one `forgemq dev` starts has none: pass --redis URL, or drop --replicas",
            connect.replicas
        ))
        .into());
    }
    let listener = crate::serve::bind(bind).await?;
    let bound = listener.local_addr()?;
    let (url, _guard) = match redis {
        Some(url) => (url.to_owned(), None),
        None => {
            let (url, guard) = start_private_redis()?;
            (url, Some(guard))
        }
    };
    let mq = crate::connect_to(&url, connect).await?;
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "forgemq".to_owned());
    // What a newcomer needs: where to look, and one line to paste to see it move.
    println!("ForgeMQ is running.");
    println!("  dashboard:  http://{bound}/");
    println!("  API:        http://{bound}/api/v1  (OpenAPI: /api/v1/openapi.json)");
    println!("  Redis:      {}", crate::redact(&url));
    println!("Publish a message from another terminal and watch the topic appear:");
    println!(
        "  {exe} --redis {} publish user.welcome '{{\"user_id\":\"123\",\"email\":\"john@example.com\"}}'",
        crate::redact(&url)
    );
    println!("Stop with Ctrl-C.");
    crate::serve::serve(mq, listener, options).await
}

fn start_private_redis() -> Result<(String, PrivateRedis)> {
    let dir = PathBuf::from(".forgemq");
    std::fs::create_dir_all(&dir).with_context(|| format!("could not create {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let lock = DataLock::take(&dir)?;
    // With the lock held, no live `forgemq dev` owns the folder; a redis-server still
    // running on it was left by one that was killed (SIGKILL stops no child). Two would
    // append to one AOF, so it is stopped first (SIGTERM: it flushes the AOF and exits).
    stop_leftover_redis(&dir)?;
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
        .arg("--pidfile")
        .arg(dir.join("redis.pid"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| {
            anyhow::anyhow!(
                "could not start redis-server ({e}); install it (Debian/Ubuntu: sudo apt-get install -y redis-server) or pass --redis URL"
            )
        })?;
    let guard = PrivateRedis { child, _lock: lock };
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
    crate::logging::say(&format!(
        "forgemq dev: started a private redis-server on port {port} (AOF always, data in {})",
        dir.display()
    ));
    Ok((format!("redis://127.0.0.1:{port}/"), guard))
}
