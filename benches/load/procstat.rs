//! Process figures from `/proc`: threads' CPU (`/proc/self/task/*/stat`, plus the receiver
//! processes' as one `receiver` group), resident memory, the load average and data dir sizes.
//! Read in, returned as plain numbers; nothing here changes anything.

use std::collections::HashMap;
use std::path::Path;

use crate::receiver::Receivers;

/// The first three fields of /proc/loadavg (other work on this machine skews every figure).
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// A `kB` field of /proc/self/status (`VmRSS:`, `VmHWM:`), in bytes.
pub fn status_bytes(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// `du`-style: allocated bytes of every file under `path` (bounded walk).
pub fn du(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![path.to_path_buf()];
    let mut budget = 1_000_000;
    while let Some(p) = stack.pop() {
        budget -= 1;
        if budget == 0 {
            break;
        }
        let Ok(md) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        total += md.blocks() * 512;
        if md.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&p) {
                stack.extend(rd.flatten().map(|e| e.path()));
            }
        }
    }
    total
}

/// utime + stime (fields 14 and 15) of a `stat` line, in seconds (USER_HZ is 100 on Linux),
/// with the thread's name less trailing digits.
pub fn stat_cpu_s(stat: &str) -> Option<(String, f64)> {
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let name = stat[open + 1..close].trim_end_matches(|c: char| c.is_ascii_digit() || c == '-');
    let rest: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    // rest[0] is field 3 (state): utime is field 14 → rest[11], stime rest[12].
    let ticks: u64 = rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?;
    Some((name.to_string(), ticks as f64 / 100.0))
}

/// CPU seconds per thread group (thread name with trailing digits dropped) and the process's.
#[derive(Debug, Clone, Default)]
pub struct Cpu {
    by_thread: HashMap<String, f64>,
    pub process_s: f64,
}

/// Groups that are not the engine: the load generator's runtime, the main thread (it only
/// waits) and the receiver processes.
const NOT_ENGINE: &[&str] = &["loadgen", "main", "receiver", "postgres"];

impl Cpu {
    pub fn now(recv: &Receivers) -> Cpu {
        let mut by_thread: HashMap<String, f64> = HashMap::new();
        let me = std::process::id().to_string();
        if let Ok(rd) = std::fs::read_dir("/proc/self/task") {
            for e in rd.flatten() {
                let tid = e.file_name().to_string_lossy().to_string();
                let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                    continue;
                };
                if let Some((name, s)) = stat_cpu_s(&stat) {
                    // Named so the main thread is not mistaken for the engine.
                    let name = if tid == me { "main".to_string() } else { name };
                    *by_thread.entry(name).or_default() += s;
                }
            }
        }
        by_thread.insert("receiver".into(), recv.cpu_s());
        // The database server's processes, with --backend postgres (none otherwise).
        let pg = crate::postgres::server_cpu_s();
        if pg > 0.0 {
            by_thread.insert("postgres".into(), pg);
        }
        let process_s = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| stat_cpu_s(&s))
            .map_or(0.0, |(_, s)| s);
        Cpu {
            by_thread,
            process_s,
        }
    }

    pub fn since(&self, before: &Cpu) -> Cpu {
        let by_thread = self
            .by_thread
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v - before.by_thread.get(k).copied().unwrap_or(0.0),
                )
            })
            .collect();
        Cpu {
            by_thread,
            process_s: self.process_s - before.process_s,
        }
    }

    /// The database server's CPU seconds (0 without `--backend postgres`).
    pub fn postgres_s(&self) -> f64 {
        self.by_thread.get("postgres").copied().unwrap_or(0.0)
    }

    /// Everything but the load generator, main, the receivers and the database server.
    pub fn engine_s(&self) -> f64 {
        self.by_thread
            .iter()
            .filter(|(k, _)| !NOT_ENGINE.contains(&k.as_str()))
            .map(|(_, v)| v.max(0.0))
            .sum()
    }

    /// The busiest thread groups in cores (CPU seconds per wall second).
    pub fn top(&self, wall_s: f64, n: usize) -> String {
        let mut v: Vec<_> = self.by_thread.iter().filter(|(_, s)| **s > 0.0).collect();
        v.sort_by(|a, b| b.1.total_cmp(a.1));
        let mut out: Vec<String> = v
            .iter()
            .take(n)
            .map(|(k, s)| format!("{k} {:.2}", *s / wall_s.max(1e-9)))
            .collect();
        out.push(format!(
            "(bench process {:.2})",
            self.process_s / wall_s.max(1e-9)
        ));
        out.join(", ")
    }
}
