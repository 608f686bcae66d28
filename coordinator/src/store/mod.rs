//! Durable state: SQLite metadata ([`db`]) and the content-addressed blob directory ([`blobs`]).
//! Only this module touches SQLite or the blob layout.

pub mod blobs;
pub mod db;
