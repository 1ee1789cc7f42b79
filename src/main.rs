//! The `kyberhook` command: parses the CLI and the config file, then runs the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kyberhook::config::Config;
use kyberhook::store::postgres;

/// glibc's allocator serialised the engine's threads on its arena locks (a third of the group
/// committer's time in the load bench's profile: sled copies tree nodes on every write);
/// jemalloc's thread caches do not. mimalloc was tried too: with transparent huge pages it
/// spent up to 30 % of the fan-out thread zeroing fresh 2 MiB pages. The benches use jemalloc
/// too, so that they measure what the binary runs.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "kyberhook",
    version,
    about = "A webhook delivery engine with an embedded store"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the engine: ingest + management API, delivery pipeline and metrics.
    Serve {
        /// Config file [default: config.toml in the working directory, else the built-in default]
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Check a config file and exit (0 when valid, 2 with the problem when not). With
    /// storage.backend = "postgres" it also connects: 75 when the database cannot be reached.
    CheckConfig {
        #[arg(long, default_value = "config.toml")]
        config: PathBuf,
    },
    /// Download a consistent snapshot of a running engine's store (POST /v1/admin/backup).
    Backup {
        /// The engine's API URL, e.g. http://127.0.0.1:8080
        #[arg(long)]
        url: String,
        /// Where to write the backup (written as FILE.partial, then renamed once checked)
        #[arg(long)]
        out: PathBuf,
        /// The admin token [default: KYBERHOOK_ADMIN_TOKEN]
        #[arg(long)]
        token: Option<String>,
        /// A PEM CA bundle to trust besides the system roots (an https:// URL)
        #[arg(long)]
        ca_file: Option<PathBuf>,
    },
    /// Write a backup into the config's storage.path, which must be empty or missing.
    Restore {
        #[arg(long)]
        from: PathBuf,
        #[arg(long)]
        config: PathBuf,
    },
    /// Rewrite a stopped engine's store into a fresh one (sled keeps 2-3x the live data).
    Compact {
        #[arg(long)]
        config: PathBuf,
    },
}

/// A runtime for a command's few awaits (backup, the PostgreSQL checks).
fn current_thread_runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("kyberhook: cannot start the runtime: {e}");
            ExitCode::from(1)
        })
}

/// Prints a maintenance command's outcome and turns it into the exit code.
fn finish(outcome: Result<String, kyberhook::maintenance::Failure>) -> ExitCode {
    match outcome {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(f) => {
            eprintln!("kyberhook: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

fn load(path: Option<PathBuf>) -> Result<Config, ExitCode> {
    let result = match path {
        Some(p) => Config::load(&p),
        None if PathBuf::from("config.toml").exists() => {
            Config::load(&PathBuf::from("config.toml"))
        }
        None => Config::load_default(),
    };
    result.map_err(|e| {
        eprintln!("kyberhook: config error: {e}");
        ExitCode::from(2)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => match load(Some(config)) {
            // With the PostgreSQL backend, a config is only good if its database answers.
            Ok(c) if postgres::is_selected(&c) => {
                let runtime = match current_thread_runtime() {
                    Ok(rt) => rt,
                    Err(code) => return code,
                };
                match runtime.block_on(postgres::check(&c)) {
                    Ok(line) => {
                        println!("{line}");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("kyberhook: {e}");
                        ExitCode::from(e.exit_code())
                    }
                }
            }
            Ok(_) => {
                println!("config ok");
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Backup {
            url,
            out,
            token,
            ca_file,
        } => {
            let token = token
                .or_else(|| std::env::var("KYBERHOOK_ADMIN_TOKEN").ok())
                .unwrap_or_default();
            let runtime = match current_thread_runtime() {
                Ok(rt) => rt,
                Err(code) => return code,
            };
            finish(runtime.block_on(kyberhook::maintenance::backup(
                &url,
                &out,
                &token,
                ca_file.as_deref(),
            )))
        }
        Command::Restore { from, config } => match load(Some(config)) {
            Ok(c) => finish(kyberhook::maintenance::restore(&from, &c)),
            Err(code) => code,
        },
        Command::Compact { config } => match load(Some(config)) {
            Ok(c) => finish(kyberhook::maintenance::compact(&c)),
            Err(code) => code,
        },
        Command::Serve { config } => {
            let config = match load(config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            kyberhook::init_logging(&config);
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("kyberhook: cannot start the runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            match runtime.block_on(kyberhook::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                // Logged by `run` in one line; exit now rather than drop the runtime, whose
                // blocked storage work would never finish.
                Err(e @ kyberhook::StartError::StorageFailed(_)) => {
                    std::process::exit(e.exit_code())
                }
                Err(e) => {
                    eprintln!("kyberhook: {e}");
                    // A standby's wait for the PostgreSQL lease runs on a blocking thread that
                    // never returns by itself: dropping the runtime would wait on it forever.
                    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
                    ExitCode::from(e.exit_code() as u8)
                }
            }
        }
    }
}
