//! A throwaway S3-compatible server for tests and the one-machine cluster: Garage
//! (<https://garagehq.deuxfleurs.fr>, installed with `cargo install garage`; AGPL, run as a
//! separate program and never linked), one node on loopback ports with its data in a fresh
//! directory, a bucket and a key made for the test. Stopped and deleted on drop, and killed
//! with the process that started it.

use std::io;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::test_postgres::free_port;

/// The bucket every test server has.
pub const BUCKET: &str = "tributary";

/// A running server.
#[derive(Debug)]
pub struct TestGarage {
    dir: PathBuf,
    binary: PathBuf,
    s3_port: u16,
    key_id: String,
    secret: String,
    server: Option<Child>,
}

/// The `garage` program: `TRIBUTARY_GARAGE`, else on `PATH`, else in `~/.cargo/bin`.
fn binary() -> io::Result<PathBuf> {
    if let Some(path) = std::env::var_os("TRIBUTARY_GARAGE") {
        return Ok(path.into());
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("garage"))
                .collect()
        })
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".cargo/bin/garage"));
    }
    candidates
        .into_iter()
        .find(|path| path.is_file())
        .ok_or_else(|| {
            io::Error::new(
            io::ErrorKind::NotFound,
            "Garage is not installed: `cargo install garage --locked` (or set TRIBUTARY_GARAGE)",
        )
        })
}

fn random_hex(bytes: usize) -> String {
    let mut raw = vec![0u8; bytes];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut raw);
    hex::encode(raw)
}

impl TestGarage {
    /// Creates and starts a server with one bucket; returns once it serves S3 requests.
    pub fn start() -> io::Result<Self> {
        let binary = binary()?;
        let (rpc, s3, admin) = (free_port()?, free_port()?, free_port()?);
        let dir =
            std::env::temp_dir().join(format!("tributary-garage-{}-{s3}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let config = format!(
            "metadata_dir = \"{dir}/meta\"\n\
             data_dir = \"{dir}/data\"\n\
             db_engine = \"sqlite\"\n\
             metadata_fsync = true\n\
             data_fsync = true\n\
             replication_factor = 1\n\
             rpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
             rpc_public_addr = \"127.0.0.1:{rpc}\"\n\
             rpc_secret = \"{secret}\"\n\
             [s3_api]\n\
             s3_region = \"garage\"\n\
             api_bind_addr = \"127.0.0.1:{s3}\"\n\
             [admin]\n\
             api_bind_addr = \"127.0.0.1:{admin}\"\n",
            dir = dir.display(),
            secret = random_hex(32),
        );
        std::fs::write(dir.join("garage.toml"), config)?;
        // Key ids are "GK" and 24 hex digits; secrets 64 hex digits.
        let mut this = Self {
            dir,
            binary,
            s3_port: s3,
            key_id: format!("GK{}", random_hex(12)),
            secret: random_hex(32),
            server: None,
        };
        let node = this.start_again()?;
        this.cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &node])?;
        this.cli(&["layout", "apply", "--version", "1"])?;
        let (key_id, secret) = (this.key_id.clone(), this.secret.clone());
        this.cli(&[
            "key",
            "import",
            "--yes",
            "-n",
            "tributary",
            &key_id,
            &secret,
        ])?;
        this.cli(&["bucket", "create", BUCKET])?;
        this.cli(&[
            "bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key", &key_id,
        ])?;
        Ok(this)
    }

    /// Starts the server (again, after [`TestGarage::stop`]: same ports, same data); returns
    /// the node's id once it answers.
    pub fn start_again(&mut self) -> io::Result<String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))?;
        self.server = Some(
            Command::new("setpriv")
                .arg("--pdeathsig=KILL")
                .arg(&self.binary)
                .arg("-c")
                .arg(self.dir.join("garage.toml"))
                .arg("server")
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()?,
        );
        self.wait_for_node()
    }

    /// Runs `garage <args>` against this server; fails with its output when it fails.
    fn cli(&self, args: &[&str]) -> io::Result<Output> {
        let output = Command::new(&self.binary)
            .arg("-c")
            .arg(self.dir.join("garage.toml"))
            .args(args)
            .output()?;
        if !output.status.success() {
            return Err(io::Error::other(format!(
                "garage {}: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&output.stdout).trim(),
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        Ok(output)
    }

    /// Waits for the node to answer and returns its id.
    fn wait_for_node(&mut self) -> io::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(server) = &mut self.server {
                if let Some(status) = server.try_wait()? {
                    return Err(io::Error::other(format!(
                        "garage exited ({status}): {}",
                        self.log()
                    )));
                }
            }
            // `node id` reads a local file; `status` needs the running server.
            let answering = self.cli(&["status"]).is_ok();
            if let Some(output) = answering
                .then(|| self.cli(&["node", "id", "-q"]).ok())
                .flatten()
            {
                let id = String::from_utf8_lossy(&output.stdout);
                if let Some(id) = id.trim().split('@').next().filter(|id| !id.is_empty()) {
                    return Ok(id.to_owned());
                }
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "garage did not start: {}",
                    self.log()
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// The blob URL for `prefix` in the test bucket.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{BUCKET}/{prefix}")
    }

    /// The `AWS_*` settings a client needs: key, region, endpoint, plain HTTP.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", self.key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret.clone()),
            ("AWS_REGION", "garage".into()),
            ("AWS_ENDPOINT", format!("http://127.0.0.1:{}", self.s3_port)),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value))
        .collect()
    }

    /// Stops the server process (its data stays) to simulate an outage.
    pub fn stop(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
    }
}

impl Drop for TestGarage {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
