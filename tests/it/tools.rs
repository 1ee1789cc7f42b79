//! The outside programs the tests run, found or installed on first use, so that `cargo test`
//! passes on a machine that has nothing but the Rust toolchain: python3 and node (the guide's
//! verifiers), PyPI and npm packages (the official Standard Webhooks libraries,
//! openapi-spec-validator, axe-core), promtool, Chromium with its WebDriver, and PostgreSQL's
//! server programs (Debian's `postgresql`, for the PostgreSQL backend's throw-away clusters).
//!
//! A test asks for a tool by calling one function here ([`python3`], [`python_with`],
//! [`promtool`], [`chromium`], …). The first call in the process finds the tool, or installs it:
//! Debian packages with `apt-get install` (as root; `apt-get update` once per process), PyPI
//! and npm packages, at pinned versions, into `target/test-tools/` (pip `--target`, npm
//! `--prefix`; a version bump installs next to the old one). The answer is kept for the
//! process ([`OnceLock`] per tool, so parallel tests wait for one install instead of racing),
//! and an exclusive lock on `target/test-tools/.lock` keeps installs of parallel processes
//! (nextest, two `cargo test`s) apart. Each install is timed into
//! `target/test-tools/installs.log`.
//!
//! A tool that cannot be had fails the test that asked for it with one line naming the tool and
//! how to install it. The old skip variables still work: with `KYBERHOOK_SKIP_BROWSER=1`,
//! `KYBERHOOK_SKIP_PROMTOOL=1`, `KYBERHOOK_SKIP_OPENAPI_VALIDATOR=1` or
//! `KYBERHOOK_SKIP_STANDARD_WEBHOOKS=1` nothing of that group is installed: a lookup answers
//! `None` (the test skips that check) unless the tool is already there.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Instant;

use fs2::FileExt;

/// A package from PyPI or npm, pinned, and the skip variable of the tests that use it.
struct Package {
    name: &'static str,
    /// What pip or npm is asked to install.
    spec: &'static str,
    skip_var: &'static str,
}

const PYPI: [Package; 2] = [
    Package {
        name: "standardwebhooks",
        spec: "standardwebhooks==1.1.0",
        skip_var: "KYBERHOOK_SKIP_STANDARD_WEBHOOKS",
    },
    Package {
        name: "openapi-spec-validator",
        spec: "openapi-spec-validator==0.9.0",
        skip_var: "KYBERHOOK_SKIP_OPENAPI_VALIDATOR",
    },
];

const NPM: [Package; 2] = [
    Package {
        name: "standardwebhooks",
        spec: "standardwebhooks@1.1.1",
        skip_var: "KYBERHOOK_SKIP_STANDARD_WEBHOOKS",
    },
    Package {
        name: "axe-core",
        spec: "axe-core@4.14.1",
        skip_var: "KYBERHOOK_SKIP_BROWSER",
    },
];

/// Debian's Chromium, its WebDriver and the fonts the screenshots and contrast checks see.
const BROWSER_DEBS: [&str; 3] = ["chromium", "chromium-driver", "fonts-liberation"];

/// Whether a tool was found (or installed), or why it cannot be had: one line.
type Found<T> = Result<T, String>;

/// `python3`, for the guide's verifier scripts.
#[track_caller]
pub fn python3() -> Command {
    Command::new(required(python3_path()))
}

/// `node`, for the guide's verifier scripts.
#[track_caller]
pub fn node() -> Command {
    Command::new(required(node_path()))
}

/// [`python3`] or [`node`] by the name the verifier tables use.
#[track_caller]
pub fn command(program: &str) -> Command {
    match program {
        "python3" => python3(),
        "node" => node(),
        other => panic!("tools: no lookup for {other:?}"),
    }
}

/// `python3` with the PyPI package `name` (see [`PYPI`]) importable, or `None` when its skip
/// variable is set and it is not installed.
#[track_caller]
pub fn python_with(name: &str) -> Option<Command> {
    let package = package(&PYPI, name);
    let dir = optional(package.skip_var, name, || pypi_package(package))?;
    let python = optional(package.skip_var, "python3", python3_path)?;
    let mut command = Command::new(python);
    command.env("PYTHONPATH", dir);
    Some(command)
}

/// `node` with the npm package `name` (see [`NPM`]) resolvable, or `None` when its skip
/// variable is set and it is not installed.
#[track_caller]
pub fn node_with(name: &str) -> Option<Command> {
    let package = package(&NPM, name);
    let dir = optional(package.skip_var, name, || npm_package(package))?;
    let node = optional(package.skip_var, "node", node_path)?;
    let mut command = Command::new(node);
    command.env("NODE_PATH", dir.join("node_modules"));
    Some(command)
}

/// promtool (Debian's `prometheus`), or `None` with `KYBERHOOK_SKIP_PROMTOOL=1` when missing.
#[track_caller]
pub fn promtool() -> Option<PathBuf> {
    static FOUND: OnceLock<Found<PathBuf>> = OnceLock::new();
    optional("KYBERHOOK_SKIP_PROMTOOL", "promtool", || {
        once(&FOUND, || {
            find_or_apt(
                "promtool",
                || on_path("promtool"),
                &["prometheus"],
                "KYBERHOOK_SKIP_PROMTOOL",
            )
        })
    })
}

/// The directory of PostgreSQL's server programs (`initdb`, `pg_ctl`, `postgres`):
/// `KYBERHOOK_POSTGRES_BIN`, else the one `initdb` on the PATH lives in, else Debian's newest
/// `/usr/lib/postgresql/VERSION/bin`; Debian's `postgresql` is installed when there is none.
/// No skip variable: the PostgreSQL backend's tests need a server to mean anything.
#[track_caller]
pub fn postgres() -> PathBuf {
    static FOUND: OnceLock<Found<PathBuf>> = OnceLock::new();
    required(once(&FOUND, || {
        find_or_apt("postgres", find_postgres, &["postgresql"], "")
    }))
}

/// A directory holding all three server programs, as [`postgres`] looks for it.
fn find_postgres() -> Option<PathBuf> {
    let complete = |dir: &Path| {
        ["initdb", "pg_ctl", "postgres"]
            .iter()
            .all(|p| dir.join(p).is_file())
    };
    if let Some(dir) = std::env::var_os("KYBERHOOK_POSTGRES_BIN") {
        return Some(PathBuf::from(dir));
    }
    // /usr/local/bin/initdb may be a link into Debian's directory, which has the others.
    if let Some(dir) = on_path("initdb")
        .and_then(|p| std::fs::canonicalize(p).ok())
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .filter(|d| complete(d))
    {
        return Some(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, e.path().join("bin")))
        })
        .filter(|(_, dir)| complete(dir))
        .collect();
    versions.sort();
    versions.pop().map(|(_, dir)| dir)
}

/// The Chromium binary (`KYBERHOOK_CHROMIUM`, else Debian's), or `None` with
/// `KYBERHOOK_SKIP_BROWSER=1` when missing.
#[track_caller]
pub fn chromium() -> Option<PathBuf> {
    static FOUND: OnceLock<Found<PathBuf>> = OnceLock::new();
    optional("KYBERHOOK_SKIP_BROWSER", "chromium", || {
        once(&FOUND, || {
            find_or_apt(
                "chromium",
                find_chromium,
                &BROWSER_DEBS,
                "KYBERHOOK_SKIP_BROWSER",
            )
        })
    })
}

/// chromedriver, or `None` with `KYBERHOOK_SKIP_BROWSER=1` when missing.
#[track_caller]
pub fn chromedriver() -> Option<PathBuf> {
    static FOUND: OnceLock<Found<PathBuf>> = OnceLock::new();
    optional("KYBERHOOK_SKIP_BROWSER", "chromedriver", || {
        once(&FOUND, || {
            find_or_apt(
                "chromedriver",
                || on_path("chromedriver"),
                &BROWSER_DEBS,
                "KYBERHOOK_SKIP_BROWSER",
            )
        })
    })
}

/// axe-core's `axe.min.js` (`KYBERHOOK_AXE`, else npm's `axe-core` under target/test-tools/),
/// or `None` with `KYBERHOOK_SKIP_BROWSER=1` when missing.
#[track_caller]
pub fn axe() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("KYBERHOOK_AXE") {
        return Some(PathBuf::from(path));
    }
    let package = package(&NPM, "axe-core");
    let dir = optional(package.skip_var, "axe-core", || npm_package(package))?;
    Some(dir.join("node_modules/axe-core/axe.min.js"))
}

/// The tool, or the test fails here with the one line that says why.
#[track_caller]
fn required<T>(found: Found<T>) -> T {
    // Not unwrap_or_else: a panic inside a closure would name this file, not the test's line.
    match found {
        Ok(tool) => tool,
        Err(line) => panic!("{line}"),
    }
}

/// The tool; without it `None` when `skip_var` is `1` (nothing is installed then), else the
/// test fails with the one line that says why.
#[track_caller]
fn optional<T>(skip_var: &str, tool: &str, get: impl FnOnce() -> Found<T>) -> Option<T> {
    if std::env::var(skip_var).is_ok_and(|v| v == "1") {
        return match already_here(get) {
            Some(found) => Some(found),
            None => {
                eprintln!("{skip_var}=1 and {tool} is not installed: skipping the check");
                None
            }
        };
    }
    Some(required(get()))
}

thread_local! {
    /// Set while a skip variable asks for a lookup that installs nothing.
    static FIND_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn find_only() -> bool {
    FIND_ONLY.with(|f| f.get())
}

/// Runs a lookup that may only find, not install.
fn already_here<T>(get: impl FnOnce() -> Found<T>) -> Option<T> {
    FIND_ONLY.with(|f| f.set(true));
    let found = get();
    FIND_ONLY.with(|f| f.set(false));
    found.ok()
}

/// The cached answer of `get` for this process. A lookup that may not install is not cached,
/// so that it cannot hide a tool from a later lookup that may.
fn once<T: Clone>(cell: &'static OnceLock<Found<T>>, get: impl FnOnce() -> Found<T>) -> Found<T> {
    if let Some(found) = cell.get() {
        return found.clone();
    }
    if find_only() {
        return get();
    }
    cell.get_or_init(get).clone()
}

fn package(table: &'static [Package], name: &str) -> &'static Package {
    table
        .iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("tools: {name:?} is not in the pinned package table"))
}

fn python3_path() -> Found<PathBuf> {
    static FOUND: OnceLock<Found<PathBuf>> = OnceLock::new();
    once(&FOUND, || {
        find_or_apt("python3", || on_path("python3"), &["python3"], "")
    })
}

fn node_path() -> Found<PathBuf> {
    static FOUND: OnceLock<Found<PathBuf>> = OnceLock::new();
    once(&FOUND, || {
        find_or_apt("node", || on_path("node"), &["nodejs"], "")
    })
}

/// The directory holding the PyPI package (for `PYTHONPATH`), installed with pip if missing.
fn pypi_package(package: &'static Package) -> Found<PathBuf> {
    static FOUND: [OnceLock<Found<PathBuf>>; PYPI.len()] = [const { OnceLock::new() }; PYPI.len()];
    let index = PYPI.iter().position(|p| p.name == package.name).unwrap();
    once(&FOUND[index], || pip_install(package))
}

/// `pip install --target target/test-tools/python/SPEC SPEC`, unless done before.
fn pip_install(package: &Package) -> Found<PathBuf> {
    let dir = tools_dir().join("python").join(package.spec);
    if dir.join(DONE).exists() {
        return Ok(dir);
    }
    if find_only() {
        return Err(format!("{} is not installed", package.spec));
    }
    let python = python3_path()?;
    if !run(Command::new(&python).args(["-m", "pip", "--version"]))
        .is_ok_and(|o| o.status.success())
    {
        apt(&["python3-pip"], "pip").map_err(|why| {
            format!(
                "pip is missing and could not be installed ({why}): install it with \
                 `apt-get install python3-pip`"
            )
        })?;
    }
    fill_once(&dir, package, |partial| {
        let pip = |extra: &[&str]| {
            let mut c = Command::new(&python);
            c.args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(["--no-input", "--target"])
            .arg(partial)
            .args(extra)
            .arg(package.spec);
            c
        };
        let out = run(&mut pip(&[]))?;
        // A distribution pip that predates the --target exemption from PEP 668.
        if !out.status.success() && last_line(&out).contains("externally-managed") {
            return run(&mut pip(&["--break-system-packages"]));
        }
        Ok(out)
    })
}

/// The `--prefix` directory of the npm package (its `node_modules/` inside), installed with npm
/// if missing.
fn npm_package(package: &'static Package) -> Found<PathBuf> {
    static FOUND: [OnceLock<Found<PathBuf>>; NPM.len()] = [const { OnceLock::new() }; NPM.len()];
    let index = NPM.iter().position(|p| p.name == package.name).unwrap();
    let dir = tools_dir().join("node").join(package.spec);
    once(&FOUND[index], || {
        if dir.join(DONE).exists() {
            return Ok(dir.clone());
        }
        if find_only() {
            return Err(format!("{} is not installed", package.spec));
        }
        node_path()?;
        let npm = find_or_apt("npm", || on_path("npm"), &["npm"], package.skip_var)?;
        fill_once(&dir, package, |partial| {
            run(Command::new(&npm)
                .args(["install", "--silent", "--no-audit", "--no-fund", "--prefix"])
                .arg(partial)
                .arg(package.spec))
        })
    })
}

/// Marks a finished package directory: a directory without it is an interrupted install.
const DONE: &str = ".kyberhook-installed";

/// Installs a package into a fresh sibling of `dir` with `install`, then moves it into place,
/// under the install lock (another process may have done it meanwhile).
fn fill_once(
    dir: &Path,
    package: &Package,
    install: impl FnOnce(&Path) -> std::io::Result<Output>,
) -> Found<PathBuf> {
    let _lock = install_lock()?;
    if dir.join(DONE).exists() {
        return Ok(dir.to_path_buf());
    }
    let partial = dir.with_file_name(format!("{}.partial", package.spec));
    let _ = std::fs::remove_dir_all(&partial);
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(&partial).map_err(|e| format!("{}: {e}", partial.display()))?;
    let started = Instant::now();
    let how = if dir.starts_with(tools_dir().join("python")) {
        format!("pip install --target {} {}", dir.display(), package.spec)
    } else {
        format!("npm install --prefix {} {}", dir.display(), package.spec)
    };
    say(&format!("{how} (once: target/test-tools/ keeps it)"));
    let failed = |why: String| {
        let skip = format!(", or set {}=1 to skip those checks", package.skip_var);
        format!(
            "{} is missing and could not be installed ({why}): run `{how}`{skip}",
            package.name
        )
    };
    let installed = match install(&partial) {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(failed(last_line(&out))),
        Err(e) => Err(failed(e.to_string())),
    };
    if let Err(line) = installed {
        let _ = std::fs::remove_dir_all(&partial);
        return Err(line);
    }
    std::fs::write(partial.join(DONE), package.spec).map_err(|e| failed(e.to_string()))?;
    std::fs::rename(&partial, dir).map_err(|e| failed(e.to_string()))?;
    log_install(&how, started);
    Ok(dir.to_path_buf())
}

/// `find()`, or after installing the Debian `debs`, `find()` again.
fn find_or_apt(
    tool: &str,
    find: impl Fn() -> Option<PathBuf>,
    debs: &[&str],
    skip_var: &str,
) -> Found<PathBuf> {
    if let Some(path) = find() {
        return Ok(path);
    }
    let skip = if skip_var.is_empty() {
        String::new()
    } else {
        format!(", or set {skip_var}=1 to skip those checks")
    };
    let how = format!("apt-get install {}", debs.join(" "));
    if find_only() {
        return Err(format!("{tool} is not installed"));
    }
    let result =
        apt(debs, tool).and_then(|()| find().ok_or_else(|| format!("{how} did not bring {tool}")));
    result.map_err(|why| {
        format!(
            "{tool} is missing and could not be installed ({why}): install it with `{how}`{skip}"
        )
    })
}

/// `apt-get install -y` of `debs`, as root; `apt-get update` first, once per process.
fn apt(debs: &[&str], tool: &str) -> Result<(), String> {
    static UPDATED: OnceLock<Result<(), String>> = OnceLock::new();
    if find_only() {
        return Err(format!("{tool} is not installed"));
    }
    if !rustix::process::geteuid().is_root() {
        return Err("not running as root, so the tests cannot apt-get install it".into());
    }
    if on_path("apt-get").is_none() {
        return Err("no apt-get on this machine".into());
    }
    let _lock = install_lock()?;
    let apt_get = |args: &[&str]| {
        let mut c = Command::new("apt-get");
        // Wait for another apt (or dpkg) instead of failing at once on its lock.
        c.args(["-q", "-o", "DPkg::Lock::Timeout=600"])
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    let started = Instant::now();
    UPDATED
        .get_or_init(|| {
            say(&format!(
                "apt-get update (once per process, to install {tool})"
            ));
            match run(&mut apt_get(&["update"])) {
                Ok(out) if out.status.success() => Ok(()),
                Ok(out) => Err(format!("apt-get update failed: {}", last_line(&out))),
                Err(e) => Err(format!("apt-get update: {e}")),
            }
        })
        .clone()?;
    say(&format!(
        "apt-get install {} (for {tool}; once)",
        debs.join(" ")
    ));
    let mut install = apt_get(&["install", "-y", "--no-install-recommends"]);
    install.args(debs);
    match run(&mut install) {
        Ok(out) if out.status.success() => {
            log_install(
                &format!("apt-get update + install {}", debs.join(" ")),
                started,
            );
            Ok(())
        }
        Ok(out) => Err(format!("apt-get install failed: {}", last_line(&out))),
        Err(e) => Err(format!("apt-get: {e}")),
    }
}

/// Serialises installs across threads and processes: `flock` on a file under target/, held
/// until the returned file is dropped.
fn install_lock() -> Found<File> {
    let dir = tools_dir();
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let path = dir.join(".lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    file.lock_exclusive()
        .map_err(|e| format!("locking {}: {e}", path.display()))?;
    Ok(file)
}

/// `target/test-tools/`, in whatever target directory cargo builds into.
fn tools_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("CARGO_TARGET_TMPDIR is <target>/tmp")
        .join("test-tools")
}

fn find_chromium() -> Option<PathBuf> {
    match std::env::var_os("KYBERHOOK_CHROMIUM") {
        Some(path) => Some(PathBuf::from(path)),
        None => on_path("chromium"),
    }
}

/// The first `name` on the PATH that is a file.
fn on_path(name: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// A progress line straight to the terminal: the test harness captures `eprintln!`, and a
/// first run should say why it takes minutes.
fn say(what: &str) {
    let _ = writeln!(std::io::stderr(), "tests/it/tools.rs: {what}");
}

/// Runs an installer with its output captured (shown only through [`last_line`] on failure).
fn run(command: &mut Command) -> std::io::Result<Output> {
    command.stdin(Stdio::null()).output()
}

/// The last line an installer printed on stderr (else stdout): usually the reason it failed.
fn last_line(out: &Output) -> String {
    let text = |bytes: &[u8]| {
        String::from_utf8_lossy(bytes)
            .lines()
            .map(str::trim)
            .rfind(|l| !l.is_empty())
            .map(str::to_string)
    };
    text(&out.stderr)
        .or_else(|| text(&out.stdout))
        .unwrap_or_else(|| format!("exit status {}", out.status))
}

/// Appends how long an install took to target/test-tools/installs.log (the README's figures).
fn log_install(what: &str, started: Instant) {
    let line = format!("{what}: {:.1} s\n", started.elapsed().as_secs_f64());
    if let Ok(mut log) = OpenOptions::new()
        .create(true)
        .append(true)
        .open(tools_dir().join("installs.log"))
    {
        let _ = log.write_all(line.as_bytes());
    }
}

#[test]
fn a_package_that_cannot_be_had_fails_with_one_line_naming_it_and_how_to_install_it() {
    let missing = Package {
        name: "kyberhook-no-such-package",
        spec: "kyberhook-no-such-package==0.0.0",
        skip_var: "KYBERHOOK_SKIP_NOTHING",
    };
    let dir = tools_dir().join("python").join(missing.spec);
    // With a skip variable set nothing is installed: the lookup only finds.
    assert!(already_here(|| pip_install(&missing)).is_none());
    let line = pip_install(&missing).expect_err("no such package on PyPI");
    assert!(!line.contains('\n'), "one line: {line}");
    for needle in [
        "kyberhook-no-such-package is missing and could not be installed",
        "pip install --target",
        "KYBERHOOK_SKIP_NOTHING=1",
    ] {
        assert!(line.contains(needle), "{needle:?} not in {line:?}");
    }
    assert!(
        !dir.exists(),
        "a failed install leaves nothing that looks installed"
    );
    assert!(!dir
        .with_file_name(format!("{}.partial", missing.spec))
        .exists());
    eprintln!("{line}");
}
