//! Micro-benchmarks of the pipeline's hot stages (criterion):
//!
//! - `signing`: `signing::signature_header` over a 1 KiB body;
//! - `canonical`: `canonical::write_canonical` (the `JSON.stringify` form of `data`, built once
//!   per event at ingest) over the guide's `visitor.checked_in` data as a producer pretty-prints
//!   it, over 16 KiB of such objects, and over 16 KiB of awkward data (escapes, floats,
//!   exponents, big integers, non-ASCII); each next to serde_json's RawValue parse of the same
//!   text (what ingest already pays), so the ratio survives a loaded machine;
//! - `codec`: `codec::encode`/`decode` of a `DeliveryRecord` and of an `EventRecord`;
//! - `wal_append`: `SledStore::append_events` + `SledStore::make_durable` (durable group
//!   commit, fsync on) at batch sizes 1, 64 and 1024, reported per event; plus the same append
//!   at 64 without the flush, to separate write cost from commit cost;
//! - `fanout_lookup`: `Registry::matching` with 10 000 webhooks loaded through
//!   `Registry::load` (1 000 accounts x 10 webhooks, and 1 account x 10 000 webhooks), and
//!   `Registry::load` itself for the 1 000 x 10 layout.
//!
//! Run: `cargo bench --bench pipeline` (filter: `cargo bench --bench pipeline -- codec`).
//! Measurement times are short on purpose; the whole file runs in a couple of minutes.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput};
use kyberhook::ids::{AccountId, DeliveryId, EventId, WebhookId};
use kyberhook::model::{Account, DeliveryRecord, EventRecord, Webhook, WebhookStatus};
use kyberhook::registry::Registry;
use kyberhook::store::embedded::SledStore;

/// The `kyberhook` binary's allocator, so the figures are the ones production gets.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const CATALOG: &[&str] = &kyberhook::config::DEFAULT_EVENT_CATALOG;

fn catalog() -> Vec<String> {
    CATALOG.iter().map(|s| s.to_string()).collect()
}

/// A realistic event body of about `size` bytes (compact JSON, the shape ingest builds).
fn event_body(id: &str, size: usize) -> Vec<u8> {
    let head = format!(
        r#"{{"id":"{id}","event":"visitor.checked_in","timestamp":"2025-01-15T09:30:00Z","data":{{"visitor":{{"name":"Ada Lovelace","email":"ada@example.com"}},"note":""#
    );
    let tail = r#""},"account_id":"acc_bench"}"#;
    let pad = size.saturating_sub(head.len() + tail.len());
    let mut out = head.into_bytes();
    out.extend(vec![b'x'; pad]);
    out.extend_from_slice(tail.as_bytes());
    out
}

fn event_record(seq: u64, body_size: usize) -> EventRecord {
    let id = EventId::from_seq(seq);
    EventRecord {
        seq,
        body: event_body(id.as_str(), body_size),
        id,
        account_id: AccountId::parse("acc_bench").unwrap(),
        event: "visitor.checked_in".into(),
    }
}

fn bench_signing(c: &mut Criterion) {
    let secret = format!("whsec_{}", "ab".repeat(32));
    let body = event_body("evt_0000000000000001", 1024);
    assert_eq!(body.len(), 1024);
    let mut g = c.benchmark_group("signing");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("signature_header_1KiB", |b| {
        b.iter(|| {
            kyberhook::signing::signature_header(
                black_box(&secret),
                black_box(1_705_312_200),
                black_box(&body),
            )
        })
    });
    g.finish();
}

/// The guide's `visitor.checked_in` data as a producer's `json.dumps(indent=2)` writes it.
const GUIDE_DATA: &str = r#"{
  "visitor": {
    "id": "vis_abc123",
    "first_name": "Jane",
    "last_name": "Smith",
    "email": "jane@example.com",
    "company": "Acme Corp",
    "purpose": "Meeting"
  },
  "host": {
    "id": "usr_xyz789",
    "name": "John Doe",
    "department": "Engineering"
  },
  "location": {
    "id": "loc_001",
    "name": "Main Office"
  },
  "check_in_time": "2025-01-15T09:30:00Z",
  "badge_number": "V-0042",
  "id_scanned": true,
  "nda_signed": true,
  "screening_status": "cleared"
}"#;

/// One awkward record: what Python's default `json.dumps` and float-happy producers send.
const AWKWARD_ITEM: &str = r#"{"name": "Zo\u00eb \u00c5ngstr\u00f6m \ud83d\ude00", "path": "a\/b", "score": 1.0, "ratio": 0.30000000000000004, "big": 12345678901234567890, "exp": 1E3, "neg": -0, "tiny": 5e-324, "ok": true, "tags": ["caf\u00e9", "na\u00efve", 2.50]}"#;

/// `item` repeated in an array under one key until the object is about `size` bytes.
fn repeated(item: &str, size: usize) -> String {
    let n = (size / (item.len() + 1)).max(1);
    format!("{{\"items\": [{}]}}", vec![item; n].join(","))
}

fn bench_canonical(c: &mut Criterion) {
    let mut g = c.benchmark_group("canonical");
    for (name, text) in [
        ("guide_data_pretty", GUIDE_DATA.to_string()),
        ("guide_data_16KiB", repeated(GUIDE_DATA, 16 * 1024)),
        ("awkward_16KiB", repeated(AWKWARD_ITEM, 16 * 1024)),
    ] {
        g.throughput(Throughput::Bytes(text.len() as u64));
        let mut out = Vec::with_capacity(text.len() + 128);
        g.bench_function(format!("{name} ({} B)", text.len()), |b| {
            b.iter(|| {
                out.clear();
                kyberhook::canonical::write_canonical(&mut out, black_box(&text), 64).unwrap();
                black_box(out.len())
            })
        });
        // Baseline on the same machine at the same moment: the validation serde_json already
        // does on every event's `data` (the API parses it as a RawValue).
        g.bench_function(
            format!("{name} serde_json RawValue parse (baseline)"),
            |b| {
                b.iter(|| {
                    let raw: &serde_json::value::RawValue =
                        serde_json::from_str(black_box(&text)).unwrap();
                    black_box(raw.get().len())
                })
            },
        );
    }
    g.finish();
}

fn bench_codec(c: &mut Criterion) {
    let event = event_record(0x0192_3456_7890_0001, 300);
    let delivery = DeliveryRecord::new(
        DeliveryId {
            seq: event.seq,
            webhook: WebhookId(0x1234_5678_9abc_def0),
        },
        &event,
        1_736_933_400_000,
        false,
    );
    let ev_bytes = kyberhook::codec::encode(&event);
    let dl_bytes = kyberhook::codec::encode(&delivery);
    let mut g = c.benchmark_group("codec");
    g.bench_function(
        format!("encode_delivery_record ({} B)", dl_bytes.len()),
        |b| b.iter(|| kyberhook::codec::encode(black_box(&delivery))),
    );
    g.bench_function(
        format!("decode_delivery_record ({} B)", dl_bytes.len()),
        |b| b.iter(|| kyberhook::codec::decode::<DeliveryRecord>(black_box(&dl_bytes)).unwrap()),
    );
    g.bench_function(format!("encode_event_record ({} B)", ev_bytes.len()), |b| {
        b.iter(|| kyberhook::codec::encode(black_box(&event)))
    });
    g.bench_function(format!("decode_event_record ({} B)", ev_bytes.len()), |b| {
        b.iter(|| kyberhook::codec::decode::<EventRecord>(black_box(&ev_bytes)).unwrap())
    });
    g.finish();
}

fn bench_wal(c: &mut Criterion) {
    let mut g = c.benchmark_group("wal_append");
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(3));
    for &n in &[1usize, 64, 1024] {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SledStore::open(dir.path(), true).expect("open store");
        let mut seq = 1u64 << 20;
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("append+make_durable", n), &n, |b, &n| {
            b.iter_batched(
                || {
                    (0..n)
                        .map(|_| {
                            seq += 1;
                            event_record(seq, 300)
                        })
                        .collect::<Vec<_>>()
                },
                |batch| {
                    store.append_events(&batch).unwrap();
                    store.make_durable().unwrap();
                },
                BatchSize::PerIteration,
            )
        });
        drop(store);
    }
    // The same writes without the commit: what the flush + fdatasync costs by difference.
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SledStore::open(dir.path(), true).expect("open store");
    let mut seq = 1u64 << 20;
    g.throughput(Throughput::Elements(64));
    g.bench_with_input(
        BenchmarkId::new("append_only_no_flush", 64),
        &64usize,
        |b, &n| {
            b.iter_batched(
                || {
                    (0..n)
                        .map(|_| {
                            seq += 1;
                            event_record(seq, 300)
                        })
                        .collect::<Vec<_>>()
                },
                |batch| store.append_events(&batch).unwrap(),
                BatchSize::PerIteration,
            )
        },
    );
    g.finish();
}

fn account(id: &str) -> Account {
    Account {
        id: AccountId::parse(id).unwrap(),
        name: id.to_string(),
        plan: "enterprise".into(),
        created_ms: 0,
        api_key_hash: kyberhook::signing::hash_api_key(id),
    }
}

/// Subscriptions cycle through exact names, a family wildcard and `*`.
fn subscription(i: usize) -> Vec<String> {
    match i % 4 {
        0 => vec!["visitor.checked_in".into()],
        1 => vec!["visitor.*".into()],
        2 => vec!["*".into()],
        _ => vec![CATALOG[i % CATALOG.len()].to_string(), "emergency.*".into()],
    }
}

fn webhook(n: u64, account: &AccountId, events: Vec<String>) -> Webhook {
    Webhook {
        id: WebhookId(0x9e37_79b9_7f4a_7c15u64.wrapping_mul(n + 1)),
        account_id: account.clone(),
        name: format!("hook {n}"),
        url: format!("https://hooks{}.example.com/in", n % 100),
        description: None,
        events,
        ip_allowlist: vec![],
        status: if n % 50 == 49 {
            WebhookStatus::Paused
        } else {
            WebhookStatus::Active
        },
        disabled_reason: None,
        consecutive_failures: 0,
        secret: format!("whsec_{n:064x}"),
        signature_scheme: Default::default(),
        previous_secret: None,
        rotation_ends_ms: None,
        ordering: Default::default(),
        max_concurrency: None,
        created_ms: 0,
        updated_ms: 0,
    }
}

/// 10 000 webhooks over `accounts` accounts.
fn population(accounts: usize, per_account: usize) -> (Vec<Account>, Vec<Webhook>) {
    let accs: Vec<Account> = (0..accounts)
        .map(|i| account(&format!("acc_{i:05}")))
        .collect();
    let mut hooks = Vec::with_capacity(accounts * per_account);
    let mut n = 0u64;
    for a in &accs {
        for j in 0..per_account {
            hooks.push(webhook(n, &a.id, subscription(j)));
            n += 1;
        }
    }
    (accs, hooks)
}

fn bench_fanout(c: &mut Criterion) {
    let mut g = c.benchmark_group("fanout_lookup");

    // 1 000 accounts x 10 webhooks.
    let (accs, hooks) = population(1_000, 10);
    let reg = Registry::new(catalog());
    reg.load(accs.clone(), hooks.clone());
    let probe = AccountId::parse("acc_00500").unwrap();
    let hits = reg.matching(&probe, "visitor.checked_in").len();
    g.bench_function(
        format!("matching 1000acc x 10wh, visitor.checked_in ({hits} hits)"),
        |b| b.iter(|| reg.matching(black_box(&probe), black_box("visitor.checked_in"))),
    );
    let hits = reg.matching(&probe, "settings.updated").len();
    g.bench_function(
        format!("matching 1000acc x 10wh, settings.updated ({hits} hits)"),
        |b| b.iter(|| reg.matching(black_box(&probe), black_box("settings.updated"))),
    );
    let missing = AccountId::parse("acc_nobody").unwrap();
    g.bench_function("matching unknown account", |b| {
        b.iter(|| reg.matching(black_box(&missing), black_box("visitor.checked_in")))
    });

    // 1 account x 10 000 webhooks (an extreme tenant). Loading it is timed once, here, since
    // `Registry::load` re-indexes the account after every webhook.
    let (accs1, hooks1) = population(1, 10_000);
    let reg1 = Registry::new(catalog());
    let t = Instant::now();
    reg1.load(accs1, hooks1);
    let load_1x10k = t.elapsed();
    eprintln!(
        "fanout_lookup: Registry::load of 1 account x 10000 webhooks took {:.3} s (timed once)",
        load_1x10k.as_secs_f64()
    );
    let one = AccountId::parse("acc_00000").unwrap();
    let hits = reg1.matching(&one, "visitor.checked_in").len();
    g.bench_function(
        format!("matching 1acc x 10000wh, visitor.checked_in ({hits} hits)"),
        |b| b.iter(|| reg1.matching(black_box(&one), black_box("visitor.checked_in"))),
    );
    let hits = reg1.matching(&one, "settings.updated").len();
    g.bench_function(
        format!("matching 1acc x 10000wh, settings.updated ({hits} hits)"),
        |b| b.iter(|| reg1.matching(black_box(&one), black_box("settings.updated"))),
    );
    g.finish();

    let mut g = c.benchmark_group("registry_load");
    g.sample_size(10);
    g.throughput(Throughput::Elements(hooks.len() as u64));
    g.bench_function("load 1000acc x 10wh", |b| {
        b.iter_batched(
            || (accs.clone(), hooks.clone()),
            |(a, h)| {
                let r = Registry::new(catalog());
                r.load(a, h);
                r
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn main() {
    // Short warm-ups and windows keep the whole file to a couple of minutes; command-line
    // flags (e.g. `-- --measurement-time 10`) still override these.
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .nresamples(20_000)
        .configure_from_args();
    bench_signing(&mut c);
    bench_canonical(&mut c);
    bench_codec(&mut c);
    bench_wal(&mut c);
    bench_fanout(&mut c);
    c.final_summary();
}
