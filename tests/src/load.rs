//! Driving many synthetic trainers at once against a coordinator, for the load generator and the
//! ingest benchmark.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use tributary_coordinator::service::{self, Running, ServeOptions, ServerLimits, TlsSource};
use tributary_coordinator::settings::load_experiment_str;
use tributary_shared::identity::Identity;
use tributary_shared::RoundId;

use crate::client::client_endpoint_at;
use crate::synthetic::{self, Fault, Report, SyntheticOptions};
use crate::tls::ServerTrust;

/// Where an in-process coordinator keeps its state: PostgreSQL and a bucket prefix, or (when
/// `None`) its data directory.
#[derive(Debug, Clone, Default)]
pub struct Storage {
    /// A `postgres://` URL.
    pub database: Option<String>,
    /// An `s3://bucket/prefix` URL (the `AWS_*` settings come from the environment).
    pub blobs: Option<String>,
}

/// A coordinator started in this process on a temporary data directory.
#[derive(Debug)]
pub struct LocalCoordinator {
    /// The running coordinator.
    pub running: Running,
    /// Its data directory (removed by [`LocalCoordinator::stop`]).
    pub data_dir: PathBuf,
}

impl LocalCoordinator {
    /// Starts a coordinator serving a synthetic experiment where all `trainers` contribute to
    /// each of `rounds` rounds, with `params` values in the adapter.
    pub async fn start(
        trainers: u32,
        rounds: u64,
        params: u64,
        codec: &str,
    ) -> anyhow::Result<Self> {
        Self::start_selecting(trainers, trainers, rounds, params, codec).await
    }

    /// [`LocalCoordinator::start`] waiting for `connected` trainers and selecting `per_round`
    /// of them each round.
    pub async fn start_selecting(
        connected: u32,
        per_round: u32,
        rounds: u64,
        params: u64,
        codec: &str,
    ) -> anyhow::Result<Self> {
        Self::start_stored(
            connected,
            per_round,
            rounds,
            params,
            codec,
            &Storage::default(),
        )
        .await
    }

    /// [`LocalCoordinator::start_selecting`] with its metadata and blobs where `storage` says.
    pub async fn start_stored(
        connected: u32,
        per_round: u32,
        rounds: u64,
        params: u64,
        codec: &str,
        storage: &Storage,
    ) -> anyhow::Result<Self> {
        let toml = experiment_toml(connected, per_round, rounds, params, codec)?;
        let config = load_experiment_str(&toml, "load", Default::default(), &[])?;
        let data_dir = std::env::temp_dir().join(format!(
            "tributary-load-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&data_dir)?;
        if let Some(url) = &storage.database {
            tributary_coordinator::store::db::bind_data_dir(
                &data_dir,
                &tributary_coordinator::store::db::Location::Postgres(url.clone()),
            )?;
        }
        if let Some(url) = &storage.blobs {
            tributary_coordinator::store::blobs::bind_blobs(&data_dir, url)?;
        }
        let running = service::start(ServeOptions {
            data_dir: data_dir.clone(),
            listen: "127.0.0.1:0".parse()?,
            experiment: Some(config),
            http: None,
            http_public: false,
            tls: TlsSource::SelfSigned {
                names: vec!["localhost".into()],
            },
            base_model: None,
            // The coordinator's defaults: trainers come from many loopback addresses, as
            // they would from many machines.
            lease: Default::default(),
            limits: ServerLimits::default(),
        })
        .await?;
        Ok(Self { running, data_dir })
    }

    /// Stops it and removes its data.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.running.shutdown().await?;
        let _ = std::fs::remove_dir_all(&self.data_dir);
        Ok(())
    }
}

/// The load experiment: `connected` trainers gathered, `per_round` selected (no over-selection),
/// a quorum of all of them, a 600 s deadline that a healthy round never reaches.
pub fn experiment_toml(
    connected: u32,
    per_round: u32,
    rounds: u64,
    params: u64,
    codec: &str,
) -> anyhow::Result<String> {
    let codec = match codec {
        "f32" | "f16" => format!("{{ kind = \"{codec}\" }}"),
        "int8" | "int4" => format!("{{ kind = \"{codec}\", block = 64 }}"),
        other => bail!("unknown codec {other}"),
    };
    Ok(format!(
        "[experiment]\nname = \"load\"\nrounds = {rounds}\n\n\
         [adapter]\nkind = \"synthetic\"\nparams = {params}\ntensors = 1\n\n\
         [selection]\ntrainers_per_round = {per_round}\nover_selection = 1.0\nquorum = {per_round}\nmin_trainers = {connected}\n\
         round_timeout_secs = 600\ngather_timeout_secs = 600\n\n\
         [training]\ncodec = {codec}\n",
    ))
}

/// What a load run measured.
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// Rounds whose close was announced.
    pub rounds_closed: usize,
    /// Wall time of round 0, from the start (includes connecting).
    pub first_round: Option<Duration>,
    /// Wall time of each later round, between consecutive close announcements.
    pub round_times: Vec<Duration>,
    /// Uploads sent.
    pub uploads: u64,
    /// Uploads acknowledged.
    pub accepted: u64,
    /// Refusals received, with reasons.
    pub rejected: Vec<String>,
    /// Uploads deferred by a busy coordinator (each sent again).
    pub deferred: u64,
    /// Time from the start until every trainer had connected once.
    pub connect_all: Option<Duration>,
    /// Every acknowledged upload's time from its last byte to its acknowledgement.
    pub ack_latencies: Vec<Duration>,
    /// Delta bytes uploaded.
    pub bytes_up: u64,
    /// Whole run.
    pub total: Duration,
}

impl LoadReport {
    /// Uploads neither acknowledged nor refused.
    pub fn lost(&self) -> u64 {
        self.uploads
            .saturating_sub(self.accepted + self.rejected.len() as u64)
    }
}

/// Runs `trainers` synthetic trainers against `addr` until the experiment finishes.
pub async fn run_trainers(
    addr: SocketAddr,
    fingerprint: &str,
    trainers: u32,
) -> anyhow::Result<LoadReport> {
    run_trainers_from(&[addr], fingerprint, 0, trainers, false).await
}

/// [`run_trainers`] with trainers `first..first + trainers` (several load generator processes
/// share one coordinator by taking disjoint ranges: identities and addresses follow the index),
/// each knowing every node of `coordinators`, and sending each delta to the node its task id
/// picks when `spread_uploads`.
pub async fn run_trainers_from(
    coordinators: &[SocketAddr],
    fingerprint: &str,
    first: u32,
    trainers: u32,
    spread_uploads: bool,
) -> anyhow::Result<LoadReport> {
    let started = Instant::now();
    let mut handles = Vec::new();
    for index in first..first + trainers {
        // One endpoint (UDP socket) per trainer, as separate machines would have, spread over
        // the loopback range so the coordinator's per-address quota applies as it would.
        let endpoint = client_endpoint_at(
            loopback_address(index),
            &ServerTrust::Fingerprint(fingerprint.to_owned()),
        )?;
        let mut secret = [0u8; 32];
        secret[..4].copy_from_slice(&index.to_le_bytes());
        secret[31] = 0x7b;
        let options = SyntheticOptions {
            coordinators: coordinators.to_vec(),
            identity: Identity::from_secret(secret),
            fault: Fault::None,
            enrollment_token: None,
            gate: None,
            hold_round: RoundId(u64::MAX),
            events: None,
            // A crowd of connecting trainers may be turned away for a while (handshake cap).
            reconnect_for: Duration::from_secs(600),
            samples: 1,
            descend: false,
            evaluate: false,
            leak: None,
            spread_uploads,
            upload_node: None,
        };
        handles.push(tokio::spawn(synthetic::run(endpoint, options)));
    }
    let mut reports: Vec<Report> = Vec::new();
    for handle in handles {
        reports.push(handle.await.context("trainer task panicked")??);
    }
    let total = started.elapsed();
    let mut closes: Vec<(RoundId, Instant)> = Vec::new();
    for report in &reports {
        for (round, at) in &report.rounds_closed {
            match closes.iter_mut().find(|(r, _)| r == round) {
                Some(existing) => existing.1 = existing.1.min(*at),
                None => closes.push((*round, *at)),
            }
        }
    }
    closes.sort();
    let mut previous = started;
    let mut durations = Vec::new();
    for (_, at) in &closes {
        durations.push(at.saturating_duration_since(previous));
        previous = *at;
    }
    let first_round = (!durations.is_empty()).then(|| durations.remove(0));
    Ok(LoadReport {
        rounds_closed: closes.len(),
        first_round,
        round_times: durations,
        uploads: reports.iter().map(|r| r.uploads).sum(),
        accepted: reports.iter().map(|r| r.accepted).sum(),
        rejected: reports
            .iter()
            .flat_map(|r| {
                r.rejected
                    .iter()
                    .map(|(reason, detail)| format!("{reason}: {detail}"))
            })
            .collect(),
        bytes_up: reports.iter().map(|r| r.bytes_up).sum(),
        deferred: reports.iter().map(|r| r.deferred).sum(),
        connect_all: reports
            .iter()
            .map(|r| r.first_connected)
            .collect::<Option<Vec<_>>>()
            .and_then(|times| times.into_iter().max())
            .map(|last| last.saturating_duration_since(started)),
        ack_latencies: reports
            .iter()
            .flat_map(|r| r.ack_latencies.iter().copied())
            .collect(),
        total,
    })
}

/// The loopback address of synthetic trainer `index`: 8 trainers per address (the default
/// identity quota of an address), from 127.1.0.0 on (all of 127.0.0.0/8 is loopback on Linux).
pub fn loopback_address(index: u32) -> std::net::IpAddr {
    let host = index / 8;
    std::net::IpAddr::from([127, 1 + (host >> 16) as u8, (host >> 8) as u8, host as u8])
}

/// The `q` quantile (0..=1) of some durations.
pub fn quantile(durations: &[Duration], q: f64) -> Option<Duration> {
    let mut sorted = durations.to_vec();
    sorted.sort();
    let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted.get(index).copied()
}

/// Median, min and max of some durations.
pub fn summarize(durations: &[Duration]) -> Option<(Duration, Duration, Duration)> {
    let mut sorted = durations.to_vec();
    sorted.sort();
    Some((
        *sorted.get(sorted.len() / 2)?,
        *sorted.first()?,
        *sorted.last()?,
    ))
}
