//! The PostgreSQL the `postgres` tests share: one throw-away cluster per test process (TLS
//! with a certificate from its own [`Pki`]), and a fresh database per test. Kept out of
//! `common` because the benches include that file and have no cluster.

use std::path::PathBuf;

use crate::common::{pki, Pki};

/// The PostgreSQL cluster this test process shares (see [`pg_database`]): started on first
/// use with TLS (a certificate for 127.0.0.1 from its own [`Pki`]; plaintext is accepted too),
/// stopped when the process exits.
pub struct SharedPg {
    pub cluster: crate::pg_cluster::PgCluster,
    /// The CA of the server's certificate (`pki.ca_file` for `storage.postgres_ca_file`).
    pub pki: Pki,
}

pub fn shared_pg() -> &'static SharedPg {
    static PG: std::sync::OnceLock<SharedPg> = std::sync::OnceLock::new();
    PG.get_or_init(|| {
        let bin = crate::tools::postgres();
        let pki = pki();
        let tls = crate::pg_cluster::ServerTls {
            cert_pem: &pki.cert_pem,
            key_pem: &pki.key_pem,
        };
        let cluster = crate::pg_cluster::PgCluster::start(&bin, Some(tls))
            .unwrap_or_else(|e| panic!("cannot start PostgreSQL from {}: {e}", bin.display()))
            .stop_when_process_exits();
        SharedPg { cluster, pki }
    })
}

/// A fresh, empty database on the shared cluster, for one test.
pub struct PgDb {
    pub name: String,
    /// `postgres://postgres@127.0.0.1:PORT/NAME` (no sslmode: TLS is used, and verified).
    pub url: String,
    pub ca_file: PathBuf,
    pub port: u16,
}

impl PgDb {
    /// A plaintext connection to it, for the test's own queries.
    pub async fn client(&self) -> tokio_postgres::Client {
        pg_connect(&format!("{}?sslmode=disable", self.url)).await
    }
}

/// Connects without TLS (the test's own queries); the connection runs on a spawned task.
pub async fn pg_connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(connection);
    client
}

pub async fn pg_database() -> PgDb {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let pg = shared_pg();
    let name = format!(
        "kh_test_{}",
        NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    );
    let admin = pg_connect(&format!("{}?sslmode=disable", pg.cluster.url("postgres"))).await;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
    PgDb {
        url: pg.cluster.url(&name),
        name,
        ca_file: pg.pki.ca_file.clone(),
        port: pg.cluster.port,
    }
}
