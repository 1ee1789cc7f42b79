//! How much delivery history one delivery may keep: the bounds of the delivery log.
//!
//! A delivery's attempts are written by the delivery writer (through
//! `store::Storage::apply_delivery_writes`), each with what the endpoint answered. Two things an endpoint or a tenant controls would otherwise grow without
//! limit: the response headers of one attempt (an endpoint may answer with hundreds of KiB of
//! them) and the number of attempts (every manual retry adds one). The outbound client caps the
//! headers with [`cap_headers`] before they become an attempt record; the store keeps the first
//! attempt and the latest [`ATTEMPTS_KEPT_LATEST`], removing the one that falls out of that
//! window when a new one is written ([`dropped_by`]). The delivery's `attempt_count` keeps the
//! true total, so the API can say how many were left out.

/// Bytes of response headers (names plus values) kept per attempt, like
/// `delivery.max_response_body_bytes` for the body.
pub const RESPONSE_HEADER_BYTES: usize = 8 << 10;
/// The name of the entry that stands for the headers that did not fit.
pub const OMITTED_HEADERS: &str = "x-kyberhook-omitted-headers";
/// Attempts kept from the start of a delivery: the first shows what the endpoint said when the
/// delivery was new.
pub const ATTEMPTS_KEPT_FIRST: u32 = 1;
/// The most recent attempts kept besides the first.
pub const ATTEMPTS_KEPT_LATEST: u32 = 20;

/// Keeps response headers, in the order they came, up to [`RESPONSE_HEADER_BYTES`] of names
/// and values. The header that crosses the bound is kept with its value cut short; the rest
/// are dropped and counted in one [`OMITTED_HEADERS`] entry, so a reader sees that the list is
/// incomplete.
pub fn cap_headers<I>(headers: I) -> Vec<(String, String)>
where
    I: IntoIterator<Item = (String, String)>,
{
    let mut kept = Vec::new();
    let mut room = RESPONSE_HEADER_BYTES;
    let mut full = false;
    let mut omitted = 0usize;
    let mut omitted_bytes = 0usize;
    for (name, mut value) in headers {
        let size = name.len() + value.len();
        if !full && size <= room {
            room -= size;
            kept.push((name, value));
            continue;
        }
        if !full && room > name.len() {
            let cut = floor_char_boundary(&value, room - name.len());
            omitted_bytes += value.len() - cut;
            value.truncate(cut);
            kept.push((name, value));
        } else {
            omitted += 1;
            omitted_bytes += size;
        }
        full = true;
    }
    if full {
        kept.push((
            OMITTED_HEADERS.to_string(),
            format!(
                "{omitted} headers and {omitted_bytes} bytes past the {RESPONSE_HEADER_BYTES}-byte limit were not kept"
            ),
        ));
    }
    kept
}

/// The largest index `<= at` that is a char boundary of `s`.
fn floor_char_boundary(s: &str, at: usize) -> usize {
    let mut at = at.min(s.len());
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// The attempt numbers that leave the kept window once attempt `number` is written: every
/// attempt after the first [`ATTEMPTS_KEPT_FIRST`] and before the latest
/// [`ATTEMPTS_KEPT_LATEST`]. `None` while every attempt is kept. A range rather than one number,
/// so a number skipped or written twice (an attempt racing a manual retry) leaves nothing behind.
pub fn dropped_by(number: u32) -> Option<std::ops::Range<u32>> {
    let end = number.checked_sub(ATTEMPTS_KEPT_LATEST - 1)?;
    let start = ATTEMPTS_KEPT_FIRST + 1;
    (end > start).then_some(start..end)
}

/// How many attempts of a delivery with `attempt_count` attempts are no longer stored, given
/// that `kept` are.
/// How many attempt records a delivery with `attempt_count` attempts keeps.
pub fn attempts_kept(attempt_count: u32) -> usize {
    attempt_count.min(ATTEMPTS_KEPT_FIRST + ATTEMPTS_KEPT_LATEST) as usize
}

pub fn attempts_omitted(attempt_count: u32, kept: usize) -> u32 {
    attempt_count.saturating_sub(u32::try_from(kept).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(name: &str, len: usize) -> (String, String) {
        (name.to_string(), "v".repeat(len))
    }

    #[test]
    fn small_headers_are_kept_whole() {
        let headers = vec![h("a", 10), h("b", 20)];
        assert_eq!(cap_headers(headers.clone()), headers);
    }

    #[test]
    fn headers_past_the_bound_are_cut_and_counted() {
        let headers: Vec<_> = (0..100).map(|i| h(&format!("x-h{i:03}"), 1000)).collect();
        let kept = cap_headers(headers);
        let (marker, text) = kept.last().unwrap();
        assert_eq!(marker, OMITTED_HEADERS);
        let body: usize = kept[..kept.len() - 1]
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum();
        assert_eq!(body, RESPONSE_HEADER_BYTES);
        // 8 whole headers of 1006 bytes, the 9th cut; 91 dropped.
        assert_eq!(kept.len(), 10);
        assert!(text.starts_with("91 headers and "), "{text}");
    }

    #[test]
    fn one_huge_header_is_cut_on_a_char_boundary() {
        let kept = cap_headers(vec![("set-cookie".to_string(), "é".repeat(300_000))]);
        assert_eq!(kept.len(), 2);
        assert!(kept[0].0.len() + kept[0].1.len() <= RESPONSE_HEADER_BYTES);
        assert!(kept[0].1.len() > RESPONSE_HEADER_BYTES - 20);
        assert!(kept[1].1.starts_with("0 headers and "), "{}", kept[1].1);
    }

    #[test]
    fn the_window_keeps_the_first_and_the_latest() {
        for n in 1..=21 {
            assert_eq!(dropped_by(n), None, "attempt {n}");
        }
        // Attempt 22 pushes attempt 2 out; attempt 30 everything up to 10.
        assert_eq!(dropped_by(22), Some(2..3));
        assert_eq!(dropped_by(30), Some(2..11));
        let kept: Vec<u32> = (1..=30)
            .filter(|n| !dropped_by(30).unwrap().contains(n))
            .collect();
        assert_eq!(
            kept.len() as u32,
            ATTEMPTS_KEPT_FIRST + ATTEMPTS_KEPT_LATEST
        );
        assert_eq!(kept[0], 1);
        assert_eq!(kept[1], 11);
        assert_eq!(attempts_omitted(30, kept.len()), 9);
    }
}
