//! Timing-wheel throughput at engine scale: 10 k and 1 M timers with a
//! 16-byte payload and deadlines spread uniformly over the next 14 days.
//!
//! Every benchmark builds its input in an untimed `iter_batched` setup and
//! hands the wheel back out of the routine, so neither construction nor
//! deallocation is measured. Throughput is reported per timer.

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use kyberhook::wheel::{TimerKey, Wheel};
use std::hint::black_box;
use std::time::Duration;

const DAY: u64 = 24 * 60 * 60 * 1_000;
const HORIZON: u64 = 14 * DAY;
const START: u64 = 1_717_171_717_171;
const SIZES: [usize; 2] = [10_000, 1_000_000];

type Payload = [u8; 16];

/// SplitMix64: deterministic and dependency-free, good enough to scatter
/// deadlines and shuffle keys.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn payload(i: usize) -> Payload {
    (i as u128).to_le_bytes()
}

fn deadlines(n: usize) -> Vec<u64> {
    let mut rng = Rng(n as u64);
    (0..n).map(|_| START + rng.below(HORIZON)).collect()
}

/// A wheel holding `n` timers at `deadlines`, and their keys in random order.
fn filled(deadlines: &[u64]) -> (Wheel<Payload>, Vec<TimerKey>) {
    let mut wheel = Wheel::with_capacity(START, deadlines.len());
    let mut keys: Vec<TimerKey> = deadlines
        .iter()
        .enumerate()
        .map(|(i, &d)| wheel.insert(d, payload(i)))
        .collect();
    let mut rng = Rng(!(deadlines.len() as u64));
    for i in (1..keys.len()).rev() {
        keys.swap(i, rng.below(i as u64 + 1) as usize);
    }
    (wheel, keys)
}

fn batch_size(n: usize) -> BatchSize {
    // A 1 M-entry wheel is ~40 MB: build one input at a time.
    if n >= 100_000 {
        BatchSize::PerIteration
    } else {
        BatchSize::SmallInput
    }
}

/// Runs `routine` on a fresh input from `setup` for each size in `SIZES`.
fn bench_sizes<I, O>(
    c: &mut Criterion,
    name: &str,
    setup: impl Fn(&[u64]) -> I,
    routine: impl Fn(I) -> O,
) {
    let mut group = c.benchmark_group(name);
    for n in SIZES {
        let ds = deadlines(n);
        if n >= 100_000 {
            group
                .sample_size(10)
                .measurement_time(Duration::from_secs(10));
        }
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &ds, |b, ds| {
            b.iter_batched(|| setup(ds), &routine, batch_size(n))
        });
    }
    group.finish();
}

fn insert(c: &mut Criterion) {
    bench_sizes(
        c,
        "wheel/insert",
        |ds| (Wheel::with_capacity(START, ds.len()), ds.to_vec()),
        |(mut wheel, ds)| {
            for (i, &d) in ds.iter().enumerate() {
                black_box(wheel.insert(d, payload(i)));
            }
            (wheel, ds)
        },
    );
}

fn remove(c: &mut Criterion) {
    bench_sizes(c, "wheel/remove", filled, |(mut wheel, keys)| {
        for &key in &keys {
            black_box(wheel.remove(key));
        }
        (wheel, keys)
    });
}

/// Everything expires in one `poll` that jumps past the horizon.
fn expire(c: &mut Criterion) {
    bench_sizes(
        c,
        "wheel/expire",
        |ds| (filled(ds).0, Vec::with_capacity(ds.len())),
        |(mut wheel, mut out)| {
            wheel.poll(START + HORIZON, &mut out);
            assert!(wheel.is_empty());
            (wheel, out)
        },
    );
}

/// Drained the way the engine will: sleep to `next_deadline`, poll, hand
/// the batch on. Includes the wake-ups that only cascade.
fn expire_stepwise(c: &mut Criterion) {
    bench_sizes(
        c,
        "wheel/expire_stepwise",
        |ds| (filled(ds).0, Vec::with_capacity(1024)),
        |(mut wheel, mut out)| {
            while let Some(at) = wheel.next_deadline() {
                wheel.poll(at, &mut out);
                black_box(&out);
                out.clear();
            }
            (wheel, out)
        },
    );
}

criterion_group!(benches, insert, remove, expire, expire_stepwise);
criterion_main!(benches);
