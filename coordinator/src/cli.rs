//! The `tributary-coordinator` command line: `serve`, `verify`, `status`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::service::{self, ServeOptions, ServerLimits, TlsSource};
use crate::settings::{experiment_env_overrides, load_experiment};
use crate::store::db::Db;
use crate::verify::verify_data_dir;
use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "tributary-coordinator",
    version,
    about = "Runs federated fine-tuning rounds over QUIC"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve an experiment to trainers.
    Serve(Box<ServeArgs>),
    /// Re-derive every round from the stored deltas and check the ledger chain.
    Verify {
        /// The data directory.
        #[arg(long, env = "TRIBUTARY_DATA_DIR")]
        data_dir: PathBuf,
    },
    /// Write an experiment's latest adapter as a PEFT folder (safetensors, adapter_config.json,
    /// model card with lineage) for upload to any PEFT-compatible hub.
    Publish {
        /// The data directory.
        #[arg(long, env = "TRIBUTARY_DATA_DIR")]
        data_dir: PathBuf,
        /// The experiment (default: the latest).
        #[arg(long)]
        experiment: Option<String>,
        /// The folder to write (must be empty or absent).
        #[arg(long)]
        to: PathBuf,
    },
    /// The pause button: limit every trainer's compute to DUTY of wall time (e.g. 0.05).
    Throttle {
        /// Allowed duty cycle, 0 to 1.
        duty: f64,
        #[command(flatten)]
        operator: OperatorArgs,
    },
    /// Pause every trainer's compute (reversible with `resume`).
    Pause {
        #[command(flatten)]
        operator: OperatorArgs,
    },
    /// Lift a `throttle` or `pause`.
    Resume {
        #[command(flatten)]
        operator: OperatorArgs,
    },
    /// Print each experiment's progress as JSON.
    Status {
        /// The data directory.
        #[arg(long, env = "TRIBUTARY_DATA_DIR")]
        data_dir: PathBuf,
    },
    /// Print each trainer's credit, derived from the ledger alone: deltas aggregated, the work
    /// they stand for (justified weight), its share, refusals.
    Credits {
        /// The data directory.
        #[arg(long, env = "TRIBUTARY_DATA_DIR")]
        data_dir: PathBuf,
        /// The experiment (default: the latest).
        #[arg(long)]
        experiment: Option<String>,
        /// Print JSON.
        #[arg(long, conflicts_with = "csv")]
        json: bool,
        /// Print CSV.
        #[arg(long)]
        csv: bool,
    },
    /// Make a new enrollment token for `[admission] mode = "token"`: the token is printed (hand
    /// it to the volunteer), its hash appended to the tokens file.
    Token {
        /// The experiment's tokens file.
        #[arg(long)]
        tokens_file: PathBuf,
        /// How many trainer identities the token may admit.
        #[arg(long, default_value_t = 1)]
        identities: u32,
    },
    /// Make a new auditor token, who may read individual deltas from the hub of an experiment
    /// that keeps them private: the token is printed, its hash appended to `DATA_DIR/auditors`.
    AuditorToken {
        /// The data directory.
        #[arg(long, env = "TRIBUTARY_DATA_DIR")]
        data_dir: PathBuf,
    },
    /// Remove blob files nothing refers to, from a data directory no `serve` is using (a
    /// running `serve` does this itself every ten minutes). Prints what it did as JSON.
    Gc {
        /// The data directory.
        #[arg(long, env = "TRIBUTARY_DATA_DIR")]
        data_dir: PathBuf,
        /// Keep unreferenced files younger than this many seconds.
        #[arg(long, default_value_t = 3600)]
        grace_secs: u64,
        /// Only report what would be removed.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(clap::Args, Debug)]
struct OperatorArgs {
    /// The coordinator's HTTP address (its `serve --http`); for a cluster, every node's,
    /// comma-separated: the order goes to each in turn until the leader takes it (standby
    /// nodes refuse it with 503, unrecorded).
    #[arg(long, env = "TRIBUTARY_HTTP")]
    http: String,
    /// The data directory holding `operator.key` (or pass --operator-key).
    #[arg(
        long,
        env = "TRIBUTARY_DATA_DIR",
        required_unless_present = "operator_key"
    )]
    data_dir: Option<PathBuf>,
    /// The operator key file.
    #[arg(long)]
    operator_key: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// The data directory (database, blobs, TLS identity).
    #[arg(long, env = "TRIBUTARY_DATA_DIR")]
    data_dir: PathBuf,
    /// Keep the metadata in PostgreSQL instead of the data directory's SQLite file:
    /// `postgres://user@host:port/database` (the password may come from `PGPASSWORD`). The
    /// data directory remembers it, so `verify`, `status` and `publish` find it.
    #[arg(long, env = "TRIBUTARY_DATABASE", value_name = "URL")]
    database: Option<String>,
    /// Keep the blobs in S3-compatible object storage instead of the data directory:
    /// `s3://bucket/prefix`, with credentials, region and endpoint from the usual AWS
    /// variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT`,
    /// `AWS_ALLOW_HTTP`). The data directory remembers it.
    #[arg(long, env = "TRIBUTARY_BLOBS", value_name = "URL")]
    blobs: Option<String>,
    /// QUIC listen address.
    #[arg(long, env = "TRIBUTARY_LISTEN", default_value = "0.0.0.0:7878")]
    listen: SocketAddr,
    /// Experiment file (TOML). Without it, the latest unfinished experiment resumes.
    #[arg(long, env = "TRIBUTARY_EXPERIMENT")]
    experiment: Option<PathBuf>,
    /// A base model file (GGUF) to serve: tasks name it by hash, and trainers that lack it
    /// download it once and cache it.
    #[arg(long, env = "TRIBUTARY_BASE_MODEL")]
    base_model: Option<PathBuf>,
    /// Override an experiment key, e.g. `--set selection.quorum=3` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// HTTP listen address for /healthz, /metrics, /status, the hub and /admin (loopback
    /// unless --http-public).
    #[arg(long, env = "TRIBUTARY_HTTP")]
    http: Option<SocketAddr>,
    /// Allow --http on a non-loopback address.
    #[arg(long)]
    http_public: bool,
    /// PEM certificate chain (with --tls-key); default: a self-signed one kept in the data dir.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Subject names for the self-signed certificate (repeatable).
    #[arg(long = "tls-name", default_values_t = vec!["localhost".to_string(), "127.0.0.1".to_string()])]
    tls_names: Vec<String>,
    /// Connections allowed from one IPv4 address or IPv6 /64.
    #[arg(long, default_value_t = 64)]
    connections_per_address: usize,
    /// Uploads received at once across all trainers; more wait in a bounded queue, and beyond
    /// it are told when to retry.
    #[arg(long, default_value_t = 64)]
    concurrent_uploads: usize,
    /// Exit once every round is committed and the final adapter is evaluated (default: keep
    /// serving downloads).
    #[arg(long)]
    exit_when_finished: bool,
    /// Write the bound address and fingerprint as JSON to this file once listening.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// With the metadata in PostgreSQL, nodes sharing it elect a leader through a lease: a
    /// standby node takes over once the leader's lease has gone unrenewed this long.
    #[arg(long, default_value_t = 5.0, value_name = "SECONDS")]
    lease_seconds: f64,
}

/// Parses the command line and runs it; the binary's whole `main`.
pub fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: logs redirected to files stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => run_serve(*args),
        Command::Verify { data_dir } => run_verify(&data_dir),
        Command::Status { data_dir } => run_status(&data_dir),
        Command::Token {
            tokens_file,
            identities,
        } => run_token(&tokens_file, identities),
        Command::AuditorToken { data_dir } => run_auditor_token(&data_dir),
        Command::Credits {
            data_dir,
            experiment,
            json,
            csv,
        } => run_credits(&data_dir, experiment.as_deref(), json, csv),
        Command::Gc {
            data_dir,
            grace_secs,
            dry_run,
        } => crate::durable::lock_data_dir(&data_dir)
            .map_err(anyhow::Error::from)
            .and_then(|_lock| {
                crate::store::gc::collect(
                    &data_dir,
                    &Default::default(),
                    std::time::Duration::from_secs(grace_secs),
                    dry_run,
                )
                .map_err(anyhow::Error::from)
            })
            .and_then(|report| {
                println!("{}", serde_json::to_string_pretty(&report)?);
                Ok(ExitCode::SUCCESS)
            }),
        Command::Throttle { duty, operator } => {
            if !(0.0..=1.0).contains(&duty) {
                eprintln!("error: the duty must be between 0 and 1");
                return ExitCode::from(2);
            }
            run_throttle((duty * 1e6).round() as u32, &operator)
        }
        Command::Pause { operator } => run_throttle(0, &operator),
        Command::Resume { operator } => {
            run_throttle(tributary_shared::wire::FULL_DUTY_PPM, &operator)
        }
        Command::Publish {
            data_dir,
            experiment,
            to,
        } => {
            let published =
                crate::publish::publish(&data_dir, experiment.as_deref(), &to).map(|published| {
                    println!(
                        "wrote {} ({} rounds, adapter {})",
                        to.display(),
                        published.rounds,
                        published.adapter
                    );
                });
            published.map(|()| ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    if let Some(url) = &args.blobs {
        std::fs::create_dir_all(&args.data_dir)
            .with_context(|| format!("cannot create {}", args.data_dir.display()))?;
        crate::store::blobs::bind_blobs(&args.data_dir, url)?;
    }
    if let Some(url) = &args.database {
        if !url.starts_with("postgres://") && !url.starts_with("postgresql://") {
            anyhow::bail!("--database takes a postgres:// URL (SQLite is the default)");
        }
        std::fs::create_dir_all(&args.data_dir)
            .with_context(|| format!("cannot create {}", args.data_dir.display()))?;
        crate::store::db::bind_data_dir(
            &args.data_dir,
            &crate::store::db::Location::Postgres(url.clone()),
        )?;
    }
    let experiment = match &args.experiment {
        Some(path) => Some(load_experiment(
            path,
            experiment_env_overrides(std::env::vars()),
            &args.overrides,
        )?),
        None => None,
    };
    let tls = match (args.tls_cert, args.tls_key) {
        (Some(cert), Some(key)) => TlsSource::Files { cert, key },
        _ => TlsSource::SelfSigned {
            names: args.tls_names,
        },
    };
    let defaults = ServerLimits::default();
    let limits = ServerLimits {
        connections_per_address: args.connections_per_address,
        uploads: crate::net::upload_queue::UploadQueueLimits {
            concurrent: args.concurrent_uploads,
            ..defaults.uploads.clone()
        },
        ..defaults
    };
    if !(0.5..=600.0).contains(&args.lease_seconds) {
        anyhow::bail!("--lease-seconds must be between 0.5 and 600");
    }
    let options = ServeOptions {
        lease: crate::lease::LeaseTiming::for_duration(std::time::Duration::from_secs_f64(
            args.lease_seconds,
        )),
        data_dir: args.data_dir,
        listen: args.listen,
        experiment,
        http: args.http,
        http_public: args.http_public,
        tls,
        base_model: args.base_model,
        limits,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let served = runtime.block_on(serve_once(
        options,
        &args.ready_file,
        args.exit_when_finished,
    ));
    match served {
        // A node that lost the lease exits, so nothing of its state outlives its leadership;
        // its supervisor starts it again, and it comes back as a standby node.
        Err(error) if error.is::<crate::lease::LostLeadership>() => {
            tracing::error!("this node lost the leader lease; exiting (restart it to stand by)");
            Ok(ExitCode::from(LOST_LEADERSHIP_EXIT))
        }
        other => other.map(|()| ExitCode::SUCCESS),
    }
}

/// `serve`'s exit status after losing the leader lease (`EX_TEMPFAIL`: start it again).
pub const LOST_LEADERSHIP_EXIT: u8 = 75;

/// Serves until stopped, finished, or (in a cluster) no longer the leader.
async fn serve_once(
    options: ServeOptions,
    ready_file: &Option<PathBuf>,
    exit_when_finished: bool,
) -> anyhow::Result<()> {
    {
        let running = service::start(options).await?;
        println!("listening on {}", running.addr);
        println!("certificate sha-256 fingerprint: {}", running.fingerprint);
        if let Some(path) = ready_file {
            let ready = serde_json::json!({
                "addr": running.addr.to_string(),
                "fingerprint": running.fingerprint,
                "http": running.http_addr.map(|a| a.to_string()),
                "experiment": running.experiment.0,
            });
            let temp = path.with_extension("tmp");
            std::fs::write(&temp, ready.to_string())?;
            std::fs::rename(&temp, path)?;
        }
        let mut progress = running.progress.clone();
        let stop = async move {
            let finished = async {
                if exit_when_finished {
                    // The final adapter's evaluation is part of the run, as long as someone
                    // is still connected to do it.
                    let _ = progress
                        .wait_for(|p| {
                            p.finished && (p.evaluations_pending == 0 || p.connected == 0)
                        })
                        .await;
                    // Give trainers a moment to read the news and hang up.
                    let _ = tokio::time::timeout(
                        std::time::Duration::from_secs(10),
                        progress.wait_for(|p| p.connected == 0),
                    )
                    .await;
                } else {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; shutting down"),
                _ = finished => tracing::info!("all rounds done; shutting down"),
            }
        };
        running.wait(stop).await
    }
}

fn run_verify(data_dir: &std::path::Path) -> anyhow::Result<ExitCode> {
    match verify_data_dir(data_dir) {
        Ok(experiments) => {
            for verified in experiments {
                println!(
                    "ok: experiment {} — {} rounds re-derived, ledger head {}, adapter {}",
                    verified.experiment,
                    verified.rounds,
                    verified
                        .head
                        .map(|h| h.to_hex())
                        .unwrap_or_else(|| "(empty)".into()),
                    verified
                        .adapter
                        .map(|h| h.to_hex())
                        .unwrap_or_else(|| "(initial)".into()),
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(error) => {
            println!("FAILED: {error}");
            Ok(ExitCode::from(2))
        }
    }
}

fn run_token(tokens_file: &std::path::Path, identities: u32) -> anyhow::Result<ExitCode> {
    use std::io::Write as _;
    let (token, line) = crate::admission::new_token(identities);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(tokens_file)
        .with_context(|| format!("cannot open {}", tokens_file.display()))?;
    writeln!(file, "{line}")?;
    file.sync_all()?;
    println!("{token}");
    eprintln!(
        "token for {identities} identit{} added to {}; the file holds only its hash",
        if identities == 1 { "y" } else { "ies" },
        tokens_file.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn run_credits(
    data_dir: &std::path::Path,
    experiment: Option<&str>,
    json: bool,
    csv: bool,
) -> anyhow::Result<ExitCode> {
    let (db, stored) = crate::publish::open_experiment(data_dir, experiment)?;
    let ledger: Vec<_> = db
        .ledger(&stored.id)?
        .into_iter()
        .map(|(_, entry)| entry)
        .collect();
    let table = crate::credits::credits(&ledger);
    if json {
        println!("{}", serde_json::to_string_pretty(&table)?);
    } else if csv {
        print!("{}", crate::credits::to_csv(&table));
    } else {
        print!("{}", crate::credits::to_table(&table));
    }
    Ok(ExitCode::SUCCESS)
}

fn run_auditor_token(data_dir: &std::path::Path) -> anyhow::Result<ExitCode> {
    let token = crate::auditors::new_token(data_dir)
        .with_context(|| format!("cannot add an auditor token in {}", data_dir.display()))?;
    println!("{token}");
    eprintln!(
        "auditor token added to {}; send it as `Authorization: Bearer TOKEN` to read individual \
         deltas from /hub/adapters/HASH",
        data_dir.join(crate::auditors::AUDITORS_FILE).display()
    );
    Ok(ExitCode::SUCCESS)
}

fn run_status(data_dir: &std::path::Path) -> anyhow::Result<ExitCode> {
    let db = Db::open_read_only_in(data_dir).context("cannot open the database")?;
    let mut out = Vec::new();
    for experiment in db.experiments()? {
        let status = db.status(&experiment.id)?;
        out.push(serde_json::json!({ "experiment": experiment.id.0, "status": status }));
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(ExitCode::SUCCESS)
}

/// Signs a throttle order with the operator key and posts it to the coordinator.
fn run_throttle(duty_ppm: u32, args: &OperatorArgs) -> anyhow::Result<ExitCode> {
    let key_path = match (&args.operator_key, &args.data_dir) {
        (Some(path), _) => path.clone(),
        (None, Some(dir)) => dir.join(crate::operator::KEY_FILE),
        (None, None) => anyhow::bail!("pass --data-dir or --operator-key"),
    };
    let text = std::fs::read_to_string(&key_path)
        .with_context(|| format!("cannot read the operator key {}", key_path.display()))?;
    let operator = tributary_shared::identity::Identity::from_secret_hex(text.trim())
        .with_context(|| format!("{} is not an operator key", key_path.display()))?;
    let issued_ms = u64::try_from(crate::net::hub::now_ms()).unwrap_or(0);
    let order = crate::operator::ThrottleOrder::sign(&operator, duty_ppm, issued_ms);
    let body = serde_json::to_string(&order)?;
    let mut passed = Vec::new();
    for host in args.http.split(',').map(|host| {
        host.trim()
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string()
    }) {
        let response = match post_order(&host, &body) {
            Ok(response) => response,
            Err(error) => {
                passed.push(format!("{host}: {error:#}"));
                continue;
            }
        };
        let first = response.lines().next().unwrap_or("no response").to_owned();
        let answer = response.split("\r\n\r\n").nth(1).unwrap_or("").trim();
        if response.starts_with("HTTP/1.1 200") {
            println!("{answer}");
            return Ok(ExitCode::SUCCESS);
        }
        // A standby node leaves orders to the leader: try the next address.
        if response.starts_with("HTTP/1.1 503") && answer.contains("stands by") {
            passed.push(format!("{host}: stands by"));
            continue;
        }
        anyhow::bail!("the coordinator at {host} refused: {first} {answer}")
    }
    anyhow::bail!("no node took the order ({})", passed.join("; "))
}

/// Posts a signed order to `/admin/throttle` at `host`; the whole HTTP response.
fn post_order(host: &str, body: &str) -> anyhow::Result<String> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(host)
        .with_context(|| format!("cannot reach the coordinator at {host}"))?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    write!(
        stream,
        "POST /admin/throttle HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}
