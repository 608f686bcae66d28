//! A throwaway PostgreSQL server for tests and the one-machine cluster: `initdb` on a fresh
//! directory, then the server on a free loopback port, stopped and deleted on drop.
//!
//! It runs the machine's own PostgreSQL (Debian's `postgresql` package puts it under
//! `/usr/lib/postgresql/<version>/bin`; `TRIBUTARY_PG_BIN` names another directory). PostgreSQL
//! refuses to run as root, so under root it runs as the `postgres` user the package creates.
//! The server dies with the process that started it, even when that process is killed.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running server.
#[derive(Debug)]
pub struct TestPostgres {
    dir: PathBuf,
    port: u16,
    bin: PathBuf,
    user: Option<(u32, u32)>,
    server: Option<Child>,
    /// Sessions must use TLS ([`TestPostgres::start_with_tls`]).
    tls: bool,
}

/// The directory holding `initdb` and `postgres`.
fn bin_dir() -> io::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("TRIBUTARY_PG_BIN") {
        return Ok(dir.into());
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").is_file() && dir.join("postgres").is_file() {
                return Ok(dir);
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "PostgreSQL is not installed (no initdb on PATH or under /usr/lib/postgresql); \
             install Debian's `postgresql` package or set TRIBUTARY_PG_BIN",
        )
    })
}

/// The uid and gid of `postgres` when this process runs as root (PostgreSQL refuses root).
fn run_as() -> io::Result<Option<(u32, u32)>> {
    use std::os::unix::fs::MetadataExt;
    if std::fs::metadata("/proc/self")?.uid() != 0 {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    passwd
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.first() == Some(&"postgres") && fields.len() > 3)
                .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
                .flatten()
        })
        .map(Some)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "running as root, and there is no `postgres` user to run PostgreSQL as",
            )
        })
}

/// `program args…`, as `postgres` when under root, killed when this process dies.
fn command(program: &Path, user: Option<(u32, u32)>) -> Command {
    let mut command = Command::new("setpriv");
    if let Some((uid, gid)) = user {
        command.args([
            format!("--reuid={uid}"),
            format!("--regid={gid}"),
            "--clear-groups".into(),
        ]);
    }
    command.arg("--pdeathsig=KILL").arg(program);
    command
}

/// Deletes the directories of servers whose test process was killed before it could.
fn remove_abandoned() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|name| name.strip_prefix("tributary-pg-"))
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A loopback port free at the time of asking (the test servers' ports).
pub(crate) fn free_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl TestPostgres {
    /// Creates and starts a server; returns once it accepts connections.
    pub fn start() -> io::Result<Self> {
        remove_abandoned();
        let bin = bin_dir()?;
        let user = run_as()?;
        let dir = std::env::temp_dir().join(format!(
            "tributary-pg-{}-{}",
            std::process::id(),
            free_port()?
        ));
        std::fs::create_dir_all(&dir)?;
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
        }
        let mut this = Self {
            dir,
            port: 0,
            bin: bin.clone(),
            user,
            server: None,
            tls: false,
        };
        let data = this.dir.join("data");
        let output = command(&bin.join("initdb"), user)
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "tributary",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .output()?;
        if !output.status.success() {
            return Err(io::Error::other(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        this.port = free_port()?;
        this.start_again()?;
        Ok(this)
    }

    /// Like [`TestPostgres::start`], with TLS required: a certificate for 127.0.0.1 and
    /// `localhost` signed by a fresh CA, whose PEM is at [`TestPostgres::ca_file`]; plain TCP
    /// sessions are rejected (`pg_hba.conf`), and [`TestPostgres::url`] asks for TLS.
    pub fn start_with_tls() -> io::Result<Self> {
        let mut this = Self::start()?;
        this.stop();
        let ca_key = rcgen::KeyPair::generate().map_err(io::Error::other)?;
        let mut ca_params =
            rcgen::CertificateParams::new(Vec::<String>::new()).map_err(io::Error::other)?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca =
            rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).map_err(io::Error::other)?;
        let server_key = rcgen::KeyPair::generate().map_err(io::Error::other)?;
        let server = rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
            .and_then(|params| params.signed_by(&server_key, &ca))
            .map_err(io::Error::other)?;
        std::fs::write(this.ca_file(), ca.pem())?;
        let data = this.dir.join("data");
        std::fs::write(data.join("server.crt"), server.pem())?;
        crate::durable::write_atomically(
            &data.join("server.key"),
            server_key.serialize_pem().as_bytes(),
            true,
        )?;
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             hostssl all all 127.0.0.1/32 trust\n\
             hostnossl all all 127.0.0.1/32 reject\n",
        )?;
        if let Some((uid, gid)) = this.user {
            for file in ["server.crt", "server.key", "pg_hba.conf"] {
                std::os::unix::fs::chown(data.join(file), Some(uid), Some(gid))?;
            }
        }
        this.tls = true;
        this.start_again()?;
        Ok(this)
    }

    /// The CA certificate (PEM) of a server started with TLS.
    pub fn ca_file(&self) -> std::path::PathBuf {
        self.dir.join("ca.pem")
    }

    /// Starts the server again after [`TestPostgres::stop`], on the same port and data.
    pub fn start_again(&mut self) -> io::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))?;
        if let Some((uid, gid)) = self.user {
            std::os::unix::fs::chown(self.dir.join("server.log"), Some(uid), Some(gid))?;
        }
        self.server = Some(
            command(&self.bin.join("postgres"), self.user)
                .arg("-D")
                .arg(self.dir.join("data"))
                .args(["-c", "listen_addresses=127.0.0.1"])
                .args(["-c", &format!("port={}", self.port)])
                .args([
                    "-c",
                    &format!("unix_socket_directories={}", self.dir.display()),
                ])
                .args(["-c", "max_connections=200"])
                .args(["-c", if self.tls { "ssl=on" } else { "ssl=off" }])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()?,
        );
        self.wait_ready()
    }

    /// Stops the server (a fast shutdown: open sessions are cut, committed data stays).
    pub fn stop(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = Command::new("kill")
                .args(["-INT", &server.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = server.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = server.kill();
            let _ = server.wait();
        }
    }

    fn wait_ready(&mut self) -> io::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(server) = &mut self.server {
                if let Some(status) = server.try_wait()? {
                    return Err(io::Error::other(format!(
                        "postgres exited ({status}): {}",
                        self.log()
                    )));
                }
            }
            if super::postgres::PgConnection::connect(&self.url("postgres"), true).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "postgres did not start: {}",
                    self.log()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection string for `database` (which [`TestPostgres::create_database`] makes);
    /// with TLS verifying the server against [`TestPostgres::ca_file`] when it requires TLS.
    pub fn url(&self, database: &str) -> String {
        let plain = self.plain_url(database);
        match self.tls {
            true => format!(
                "{plain}&sslmode=verify-full&sslrootcert={}",
                self.ca_file().display()
            ),
            false => plain,
        }
    }

    /// A connection string for `database` over plain TCP.
    pub fn plain_url(&self, database: &str) -> String {
        format!(
            "postgres://tributary@127.0.0.1:{}/{database}?connect_timeout=10",
            self.port
        )
    }

    /// Creates an empty database and returns its connection string.
    pub fn create_database(&self, name: &str) -> Result<String, crate::store::db::DbError> {
        self.run_sql("postgres", &format!("CREATE DATABASE \"{name}\""))?;
        Ok(self.url(name))
    }

    /// Runs statements (no parameters, results dropped) in `database` as the superuser.
    pub fn run_sql(&self, database: &str, sql: &str) -> Result<(), crate::store::db::DbError> {
        super::postgres::PgConnection::connect(&self.url(database), false)?.batch(sql)
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
