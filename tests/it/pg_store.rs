//! The PostgreSQL store keeps the storage contract: the same checks the embedded store passes
//! (`kyberhook::store::conformance`), each on a fresh database of the shared test cluster.

use std::sync::Arc;

use kyberhook::config::Config;
use kyberhook::store::postgres::PgStore;
use kyberhook::store::Storage;

use crate::pg::{pg_database, PgDb};

/// What must outlive one check's store: its database's runtime and the data dir (which holds
/// the node's generated secrets key).
pub struct Open {
    _dir: tempfile::TempDir,
    _rt: tokio::runtime::Runtime,
    pub db: PgDb,
}

/// A config for `db` with its data dir in `dir`.
pub fn pg_config(db: &PgDb, dir: &std::path::Path) -> Config {
    Config::from_toml(
        &format!(
            "[storage]\npath = \"{}\"\nbackend = \"postgres\"\npostgres_url = \"{}\"\npostgres_ca_file = \"{}\"\n",
            dir.join("data").display(),
            db.url,
            db.ca_file.display()
        ),
        "test",
    )
    .unwrap()
}

fn open() -> (Open, Arc<dyn Storage>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let db = rt.block_on(pg_database());
    let dir = tempfile::tempdir().unwrap();
    let store = PgStore::open(&pg_config(&db, dir.path()), None).unwrap();
    (
        Open {
            _dir: dir,
            _rt: rt,
            db,
        },
        Arc::new(store),
    )
}

kyberhook::backend_conformance!(open);
