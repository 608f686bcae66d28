//! `tributary-test-stores`: a throwaway PostgreSQL server and a throwaway Garage S3 server
//! (the test harnesses' own), for `deploy/cluster.sh`. Prints their settings as shell
//! assignments, then runs until it is killed; both servers die with it.

use std::io::Write as _;

use anyhow::Context as _;
use tributary_coordinator::store::test_garage::TestGarage;
use tributary_coordinator::store::test_postgres::TestPostgres;

fn main() -> anyhow::Result<()> {
    let postgres = TestPostgres::start().context("cannot start PostgreSQL")?;
    let database = postgres
        .create_database("tributary")
        .context("cannot create the database")?;
    let objects = TestGarage::start().context("cannot start Garage")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "DATABASE='{database}'")?;
    writeln!(out, "BLOBS='{}'", objects.url("cluster"))?;
    for (key, value) in objects.env() {
        writeln!(out, "export {key}='{value}'")?;
    }
    writeln!(out, "STORES_READY=1")?;
    out.flush()?;
    drop(out);
    loop {
        std::thread::park();
    }
}
