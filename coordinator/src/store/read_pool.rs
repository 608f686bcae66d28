//! A few read-only database sessions shared by the HTTP hub's pages, instead of one opened per
//! request: with PostgreSQL each session is a server connection (and a backend process), and
//! the 64 requests the HTTP limits let in at once could otherwise take most of a default
//! server's 100 connections.

use std::sync::Mutex;

use crate::store::db::{Db, DbError, Location};

/// Read-only sessions, opened on demand up to a bound and kept for reuse.
#[derive(Debug)]
pub struct ReadPool {
    location: Location,
    idle: Mutex<Vec<Db>>,
    /// At most this many sessions exist at once; more readers wait for one.
    sessions: tokio::sync::Semaphore,
}

impl ReadPool {
    /// A pool of at most `max_sessions` read-only sessions to `location`.
    pub fn new(location: Location, max_sessions: usize) -> Self {
        Self {
            location,
            idle: Mutex::new(Vec::new()),
            sessions: tokio::sync::Semaphore::new(max_sessions.max(1)),
        }
    }

    /// Runs `read` on a session, off the async threads. A session whose read failed is
    /// dropped rather than reused (its connection may be what failed); the next read opens a
    /// fresh one.
    pub async fn read<T, E>(
        self: &std::sync::Arc<Self>,
        read: impl FnOnce(&Db) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<DbError> + From<tokio::task::JoinError> + Send + 'static,
    {
        let _permit = self
            .sessions
            .acquire()
            .await
            .expect("the pool's semaphore is never closed");
        let pool = self.clone();
        tokio::task::spawn_blocking(move || {
            let reused = pool.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let db = match reused {
                Some(db) => db,
                None => Db::open_read_only_at(&pool.location)?,
            };
            let answer = read(&db);
            if answer.is_ok() {
                pool.idle.lock().unwrap_or_else(|e| e.into_inner()).push(db);
            }
            answer
        })
        .await?
    }

    /// Sessions open and idle now.
    pub fn idle(&self) -> usize {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}
