//! TEMPORARY stand-in with the wheel's API (BTreeMap based) until the real wheel lands.
use std::collections::BTreeMap;
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TimerKey {
    idx: u64,
}
pub struct Wheel<T> {
    now: u64,
    next: u64,
    map: BTreeMap<(u64, u64), T>,
}
impl<T> Wheel<T> {
    pub fn new(now_ms: u64) -> Self {
        Wheel {
            now: now_ms,
            next: 0,
            map: BTreeMap::new(),
        }
    }
    pub fn now(&self) -> u64 {
        self.now
    }
    pub fn len(&self) -> usize {
        self.map.len()
    }
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
    pub fn insert(&mut self, when: u64, value: T) -> TimerKey {
        self.next += 1;
        self.map.insert((when, self.next), value);
        TimerKey { idx: self.next }
    }
    pub fn next_deadline(&self) -> Option<u64> {
        self.map.keys().next().map(|k| k.0)
    }
    pub fn poll_at_most(&mut self, now_ms: u64, max: usize, out: &mut Vec<(u64, T)>) -> usize {
        self.now = self.now.max(now_ms);
        let mut n = 0;
        while n < max {
            let Some(k) = self.map.keys().next().copied() else {
                break;
            };
            if k.0 > self.now {
                break;
            }
            let v = self.map.remove(&k).unwrap();
            out.push((k.0, v));
            n += 1;
        }
        n
    }
}
