//! Driving the leader lease ([`crate::lease`]) against the database: a standby node waits for
//! the lease (refusing trainers meanwhile, so they move on to the leader), and the leader keeps
//! it alive in a task of its own and says when it is lost.

use std::path::Path;
use std::time::Instant;

use anyhow::Context as _;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::lease::{Holder, Holding, LeaseTiming, Standby, Watcher};
use crate::store::db::{Db, DbError, Location};
use crate::store::leases::{Fence, LEADER};

/// The file in a data directory holding the node's id in a cluster.
pub const NODE_ID_FILE: &str = "node.id";

/// The node id of a data directory, made on first use. Only one process serves a data
/// directory (its lock), so a lease record naming this id was left by this node's earlier
/// process, which is gone: a restarted node takes its own lease back at once.
pub fn node_id(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join(NODE_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_owned()),
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error).with_context(|| format!("cannot read {}", path.display())),
    }
    let id = hex::encode(rand::random::<[u8; 8]>());
    crate::durable::write_atomically(&path, format!("{id}\n").as_bytes(), false)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(id)
}

/// Runs `call` on `db` on a blocking thread (a PostgreSQL call waits on its connection's
/// thread) and hands the handle back with the answer.
async fn on_db<T: Send + 'static>(
    db: Db,
    call: impl FnOnce(&Db) -> Result<T, DbError> + Send + 'static,
) -> anyhow::Result<(Db, Result<T, DbError>)> {
    tokio::task::spawn_blocking(move || {
        let answer = call(&db);
        (db, answer)
    })
    .await
    .context("a database call panicked")
}

/// Waits until this node holds the leader lease (meanwhile the caller serves the node's
/// endpoint as a standby: `net::relay`). Returns a connection for the lease keeper and the
/// lease as held.
pub async fn acquire(
    location: &Location,
    node: &str,
    address: &str,
    timing: LeaseTiming,
) -> anyhow::Result<(Db, Holder)> {
    let mut db = Db::open_at(location).context("cannot open the database for the lease")?;
    let mut watcher = Watcher::new(node, timing);
    let mut announced: Option<(String, i64)> = None;
    loop {
        let (returned, read) = on_db(db, |db| db.lease(LEADER)).await?;
        db = returned;
        let now = Instant::now();
        let wait_until = match read {
            Err(error) => {
                tracing::warn!(%error, "cannot read the leader lease; trying again");
                watcher.read_failed();
                now + timing.poll_every
            }
            Ok(record) => match watcher.observe(now, record.clone()) {
                Standby::WaitUntil(at) => {
                    if let Some(record) = &record {
                        let current = (record.holder.clone(), record.token);
                        if announced.as_ref() != Some(&current) {
                            tracing::info!(
                                leader = %record.holder, address = %record.address,
                                token = record.token,
                                "standby: another node leads; taking over if its lease lapses"
                            );
                            announced = Some(current);
                        }
                    }
                    at
                }
                Standby::Acquire { seen } => {
                    let started = Instant::now();
                    let (me, address) = (node.to_owned(), address.to_owned());
                    let (returned, taken) = on_db(db, move |db| {
                        db.acquire_lease(LEADER, &me, &address, seen.as_ref())
                    })
                    .await?;
                    db = returned;
                    match taken {
                        Ok(Some(token)) => {
                            tracing::info!(node, token, "this node took the leader lease");
                            return Ok((db, Holder::new(timing, token, started)));
                        }
                        Ok(None) => {
                            tracing::info!("another node took the leader lease first");
                            watcher.lost_race();
                        }
                        Err(error) => {
                            tracing::warn!(%error, "cannot take the leader lease; trying again")
                        }
                    }
                    Instant::now() + timing.poll_every
                }
            },
        };
        tokio::time::sleep_until(wait_until.into()).await;
    }
}

/// The leader's hold on the lease: a task renews it, `lost` turns true when it is gone.
#[derive(Debug)]
pub struct Leadership {
    /// The fence the leader's writes carry.
    pub fence: Fence,
    /// Turns true when the lease is lost (taken over, or not renewed in time).
    pub lost: watch::Receiver<bool>,
    stop: Option<oneshot::Sender<()>>,
    keeper: Option<JoinHandle<()>>,
}

impl Leadership {
    /// Starts renewing the lease `holder` holds, on its own connection `db`.
    pub fn keep(db: Db, node: String, holder: Holder) -> Self {
        let fence = Fence {
            name: LEADER.into(),
            holder: node.clone(),
            token: holder.token(),
        };
        let (lost_tx, lost) = watch::channel(false);
        let (stop, stop_rx) = oneshot::channel();
        let keeper = tokio::spawn(renew(db, node, holder, lost_tx, stop_rx));
        Self {
            fence,
            lost,
            stop: Some(stop),
            keeper: Some(keeper),
        }
    }

    /// Stops renewing and lets the lease go, so a standby node takes over without waiting.
    pub async fn release(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(keeper) = self.keeper.take() {
            let _ = keeper.await;
        }
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        if let Some(keeper) = &self.keeper {
            keeper.abort();
        }
    }
}

/// Renews the lease until stopped (then releases it) or until it is lost.
async fn renew(
    mut db: Db,
    node: String,
    mut holder: Holder,
    lost: watch::Sender<bool>,
    mut stop: oneshot::Receiver<()>,
) {
    loop {
        match holder.poll(Instant::now()) {
            Holding::StepDown => {
                tracing::error!(
                    give_up = ?holder.step_down_at().saturating_duration_since(Instant::now()),
                    "the leader lease could not be renewed for too long; stepping down (a node \
                     that reaches the database may lead now)"
                );
                let _ = lost.send(true);
                return;
            }
            Holding::WaitUntil(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at.into()) => {}
                    _ = &mut stop => {
                        let (node, token) = (node.clone(), holder.token());
                        match on_db(db, move |db| db.release_lease(LEADER, &node, token)).await {
                            Ok((_, Ok(true))) => tracing::info!("leader lease released"),
                            Ok((_, Ok(false))) => {}
                            Ok((_, Err(error))) => {
                                tracing::warn!(%error, "cannot release the leader lease")
                            }
                            Err(error) => tracing::warn!(%error, "cannot release the leader lease"),
                        }
                        return;
                    }
                }
            }
            Holding::Renew => {
                let started = Instant::now();
                let (node_now, token) = (node.clone(), holder.token());
                // A renewal that hangs must not hold the step-down back.
                let call = on_db(db, move |db| db.renew_lease(LEADER, &node_now, token));
                let answer = tokio::time::timeout_at(holder.step_down_at().into(), call).await;
                match answer {
                    Err(_) => {
                        tracing::error!(
                            "renewing the leader lease hung for too long; stepping down (a node \
                             that reaches the database may lead now)"
                        );
                        let _ = lost.send(true);
                        return;
                    }
                    Ok(Err(error)) => {
                        tracing::error!(%error, "the lease keeper failed; stepping down");
                        let _ = lost.send(true);
                        return;
                    }
                    Ok(Ok((returned, renewed))) => {
                        db = returned;
                        match renewed {
                            Ok(true) => holder.renewed(started),
                            Ok(false) => {
                                tracing::error!(
                                    "another node took the leader lease; stepping down"
                                );
                                let _ = lost.send(true);
                                return;
                            }
                            // The database is away: nothing this node tells trainers is
                            // durable meanwhile (its batches fail too), so it keeps trying.
                            Err(error) => {
                                tracing::warn!(%error, "cannot renew the leader lease; trying again");
                                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                            }
                        }
                    }
                }
            }
        }
    }
}
