//! Canonical JSON: rewrites a producer's JSON value into exactly the text JavaScript's
//! `JSON.stringify(JSON.parse(text))` produces, so that a receiver that re-serialises the parsed
//! body (the guide's Node verifier does: `JSON.stringify(req.body)`) gets back the very bytes
//! that were signed.
//!
//! Data enters as the producer's `data` text (already parsed once by the API, so it is valid
//! JSON; the rewriter still checks every byte and fails cleanly on anything else) and leaves
//! appended to the caller's body buffer. It is one streaming pass with no tree:
//!
//! - **strings** keep every character and get only the escapes `JSON.stringify` writes (`\"`,
//!   `\\`, `\b \f \n \r \t`, `\u00xx` for other control characters, and `\udxxx` for a lone
//!   surrogate); `\/`, `\u00e9` and escaped surrogate pairs become the characters themselves.
//!   Lone surrogates (`"\ud800"`, which UTF-8 cannot carry) are kept, written as
//!   `JSON.stringify` writes them, so JavaScript reads the same string back;
//! - **numbers** become the IEEE double JavaScript reads (round to nearest, so an integer above
//!   2^53 loses digits, `1e400` is `Infinity`), printed as ECMAScript's `Number::toString`
//!   prints it (`ryu-js`): `1.0` → `1`, `1E3` → `1000`, `-0` → `0`, `1e21` → `1e+21`, and a
//!   non-finite result → `null`, as `JSON.stringify` writes it. Integers of at most 15 digits
//!   are copied as they are (they are exact doubles that print the same): the common case costs
//!   no float conversion;
//! - **objects** keep the producer's key order, except where a JavaScript object does not:
//!   keys that are array indices (`"0"` … `"4294967294"`) come first in ascending numeric
//!   order, and a repeated key keeps its first position with its last value (as `JSON.parse`
//!   does). Only an object with such a key is rebuilt; every other one is written in the pass;
//! - insignificant whitespace is dropped.
//!
//! The pass copies runs of plain string bytes at once and records each object member's key
//! and extent on one stack shared by all open objects; repeated keys are found by comparing
//! keys in canonical spelling, pairwise for up to 16 members and by hashing above that.
//! Tested against node itself on generated texts
//! (`tests::properties::matches_node_json_stringify`).

use std::collections::HashMap;

/// Why a text could not be rewritten.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CanonicalError {
    #[error("not valid JSON at byte {0}")]
    Syntax(usize),
    #[error("objects and arrays nest deeper than {0} levels")]
    TooDeep(usize),
}

/// Appends the `JSON.stringify` form of the JSON value `json` to `out`. Objects and arrays
/// may nest at most `max_depth` levels (the outermost one is level 1). On error, `out` holds
/// a partial value the caller must discard.
pub fn write_canonical(
    out: &mut Vec<u8>,
    json: &str,
    max_depth: usize,
) -> Result<(), CanonicalError> {
    let mut w = Writer {
        src: json.as_bytes(),
        pos: 0,
        out,
        max_depth,
        members: Vec::new(),
    };
    w.skip_ws();
    w.value(0)?;
    w.skip_ws();
    if w.pos != w.src.len() {
        return Err(CanonicalError::Syntax(w.pos));
    }
    Ok(())
}

/// The `JSON.stringify` form of `json` as a new string (tests, tools).
pub fn canonical(json: &str, max_depth: usize) -> Result<String, CanonicalError> {
    let mut out = Vec::with_capacity(json.len());
    write_canonical(&mut out, json, max_depth)?;
    // Everything written is either copied from a `&str` at character boundaries or ASCII.
    String::from_utf8(out).map_err(|e| CanonicalError::Syntax(e.utf8_error().valid_up_to()))
}

/// One object member as written to `out`: the key (with its quotes) at
/// `key_start..key_end`, the value up to `end`.
#[derive(Clone, Copy)]
struct Member {
    key_start: usize,
    key_end: usize,
    end: usize,
}

struct Writer<'a> {
    src: &'a [u8],
    pos: usize,
    out: &'a mut Vec<u8>,
    max_depth: usize,
    /// The members of every object being written, innermost last; one stack shared by all
    /// levels so that nested objects allocate nothing.
    members: Vec<Member>,
}

/// Bytes that end a run of string characters copied as they are: the closing quote, an
/// escape, and control characters (invalid raw in JSON).
static STRING_STOP: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = true;
        i += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
};

const HEX: &[u8; 16] = b"0123456789abcdef";

impl Writer<'_> {
    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.src.get(self.pos) {
            self.pos += 1;
        }
    }

    fn syntax(&self) -> CanonicalError {
        CanonicalError::Syntax(self.pos)
    }

    fn value(&mut self, depth: usize) -> Result<(), CanonicalError> {
        match self.src.get(self.pos) {
            Some(b'{') => self.object(depth + 1),
            Some(b'[') => self.array(depth + 1),
            Some(b'"') => self.string(),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'n') => self.literal(b"null"),
            _ => Err(self.syntax()),
        }
    }

    fn literal(&mut self, word: &[u8]) -> Result<(), CanonicalError> {
        if !self.src[self.pos..].starts_with(word) {
            return Err(self.syntax());
        }
        self.pos += word.len();
        self.out.extend_from_slice(word);
        Ok(())
    }

    fn enter(&self, depth: usize) -> Result<(), CanonicalError> {
        if depth > self.max_depth {
            Err(CanonicalError::TooDeep(self.max_depth))
        } else {
            Ok(())
        }
    }

    fn array(&mut self, depth: usize) -> Result<(), CanonicalError> {
        self.enter(depth)?;
        self.pos += 1;
        self.out.push(b'[');
        self.skip_ws();
        if self.src.get(self.pos) == Some(&b']') {
            self.pos += 1;
            self.out.push(b']');
            return Ok(());
        }
        loop {
            self.skip_ws();
            self.value(depth)?;
            self.skip_ws();
            match self.src.get(self.pos) {
                Some(b',') => self.out.push(b','),
                Some(b']') => {
                    self.pos += 1;
                    self.out.push(b']');
                    return Ok(());
                }
                _ => return Err(self.syntax()),
            }
            self.pos += 1;
        }
    }

    fn object(&mut self, depth: usize) -> Result<(), CanonicalError> {
        self.enter(depth)?;
        let start = self.out.len();
        self.pos += 1;
        self.out.push(b'{');
        self.skip_ws();
        if self.src.get(self.pos) == Some(&b'}') {
            self.pos += 1;
            self.out.push(b'}');
            return Ok(());
        }
        let first = self.members.len();
        loop {
            self.skip_ws();
            if self.src.get(self.pos) != Some(&b'"') {
                return Err(self.syntax());
            }
            let key_start = self.out.len();
            self.string()?;
            let key_end = self.out.len();
            self.skip_ws();
            if self.src.get(self.pos) != Some(&b':') {
                return Err(self.syntax());
            }
            self.pos += 1;
            self.out.push(b':');
            self.skip_ws();
            self.value(depth)?;
            self.members.push(Member {
                key_start,
                key_end,
                end: self.out.len(),
            });
            self.skip_ws();
            match self.src.get(self.pos) {
                Some(b',') => self.out.push(b','),
                Some(b'}') => {
                    self.pos += 1;
                    self.out.push(b'}');
                    break;
                }
                _ => return Err(self.syntax()),
            }
            self.pos += 1;
        }
        if needs_reorder(self.out, &self.members[first..]) {
            reorder(self.out, start, &self.members[first..]);
        }
        self.members.truncate(first);
        Ok(())
    }

    /// A string at `pos` (its opening quote), written with `JSON.stringify`'s escapes.
    fn string(&mut self) -> Result<(), CanonicalError> {
        self.pos += 1;
        self.out.push(b'"');
        loop {
            let run = self.pos;
            while self
                .src
                .get(self.pos)
                .is_some_and(|&b| !STRING_STOP[b as usize])
            {
                self.pos += 1;
            }
            self.out.extend_from_slice(&self.src[run..self.pos]);
            match self.src.get(self.pos) {
                Some(b'"') => {
                    self.pos += 1;
                    self.out.push(b'"');
                    return Ok(());
                }
                Some(b'\\') => self.escape()?,
                // A raw control character or the end of the text: not JSON.
                _ => return Err(self.syntax()),
            }
        }
    }

    /// The escape at `pos` (its backslash).
    fn escape(&mut self) -> Result<(), CanonicalError> {
        let short = match self.src.get(self.pos + 1) {
            Some(&c @ (b'"' | b'\\' | b'b' | b'f' | b'n' | b'r' | b't')) => Some(c),
            Some(b'/') => {
                self.pos += 2;
                self.out.push(b'/');
                return Ok(());
            }
            Some(b'u') => None,
            _ => return Err(self.syntax()),
        };
        if let Some(c) = short {
            self.pos += 2;
            self.out.extend_from_slice(&[b'\\', c]);
            return Ok(());
        }
        let unit = self.hex4(self.pos + 2).ok_or_else(|| self.syntax())?;
        self.pos += 6;
        match unit {
            0xD800..=0xDBFF => {
                let low = (self.src.get(self.pos) == Some(&b'\\')
                    && self.src.get(self.pos + 1) == Some(&b'u'))
                .then(|| self.hex4(self.pos + 2))
                .flatten()
                .filter(|l| (0xDC00..=0xDFFF).contains(l));
                match low {
                    Some(low) => {
                        self.pos += 6;
                        let c = 0x10000
                            + ((u32::from(unit) - 0xD800) << 10)
                            + (u32::from(low) - 0xDC00);
                        self.push_char(char::from_u32(c).ok_or_else(|| self.syntax())?);
                    }
                    None => self.push_unit_escape(unit),
                }
            }
            0xDC00..=0xDFFF => self.push_unit_escape(unit),
            _ => {
                let c = char::from_u32(u32::from(unit)).ok_or_else(|| self.syntax())?;
                self.push_char(c);
            }
        }
        Ok(())
    }

    fn hex4(&self, at: usize) -> Option<u16> {
        let digits = self.src.get(at..at + 4)?;
        let mut v = 0u16;
        for &d in digits {
            v = v << 4 | (d as char).to_digit(16)? as u16;
        }
        Some(v)
    }

    /// One character of a string, escaped as `JSON.stringify` escapes it.
    fn push_char(&mut self, c: char) {
        match c {
            '"' => self.out.extend_from_slice(b"\\\""),
            '\\' => self.out.extend_from_slice(b"\\\\"),
            '\u{8}' => self.out.extend_from_slice(b"\\b"),
            '\u{c}' => self.out.extend_from_slice(b"\\f"),
            '\n' => self.out.extend_from_slice(b"\\n"),
            '\r' => self.out.extend_from_slice(b"\\r"),
            '\t' => self.out.extend_from_slice(b"\\t"),
            c if (c as u32) < 0x20 => self.push_unit_escape(c as u16),
            c => {
                let mut buf = [0u8; 4];
                self.out
                    .extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }

    /// `\uxxxx` with lowercase hex digits, as `JSON.stringify` writes it.
    fn push_unit_escape(&mut self, unit: u16) {
        self.out.extend_from_slice(&[
            b'\\',
            b'u',
            HEX[usize::from(unit >> 12)],
            HEX[usize::from(unit >> 8 & 0xF)],
            HEX[usize::from(unit >> 4 & 0xF)],
            HEX[usize::from(unit & 0xF)],
        ]);
    }

    /// A number at `pos`, written as JavaScript prints the double it reads.
    fn number(&mut self) -> Result<(), CanonicalError> {
        let start = self.pos;
        let digits = |s: &Self, mut at: usize| {
            while s.src.get(at).is_some_and(u8::is_ascii_digit) {
                at += 1;
            }
            at
        };
        if self.src[self.pos] == b'-' {
            self.pos += 1;
        }
        let int_start = self.pos;
        match self.src.get(self.pos) {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => self.pos = digits(self, self.pos),
            _ => return Err(self.syntax()),
        }
        let int_digits = self.pos - int_start;
        let mut plain = true;
        if self.src.get(self.pos) == Some(&b'.') {
            let end = digits(self, self.pos + 1);
            if end == self.pos + 1 {
                return Err(CanonicalError::Syntax(end));
            }
            self.pos = end;
            plain = false;
        }
        if let Some(b'e' | b'E') = self.src.get(self.pos) {
            let mut at = self.pos + 1;
            if let Some(b'+' | b'-') = self.src.get(at) {
                at += 1;
            }
            let end = digits(self, at);
            if end == at {
                return Err(CanonicalError::Syntax(end));
            }
            self.pos = end;
            plain = false;
        }
        let text = &self.src[start..self.pos];
        // At most 15 digits: an exact double that prints as written (only -0 differs).
        if plain && int_digits <= 15 {
            if text == b"-0" {
                self.out.push(b'0');
            } else {
                self.out.extend_from_slice(text);
            }
            return Ok(());
        }
        // The token is ASCII by construction.
        let text = std::str::from_utf8(text).map_err(|_| CanonicalError::Syntax(start))?;
        let v: f64 = text.parse().map_err(|_| CanonicalError::Syntax(start))?;
        if !v.is_finite() {
            self.out.extend_from_slice(b"null");
        } else if v == 0.0 {
            self.out.push(b'0');
        } else {
            self.out
                .extend_from_slice(ryu_js::Buffer::new().format_finite(v).as_bytes());
        }
        Ok(())
    }
}

/// The value of a key that is a JavaScript array index (`"0"` … `"4294967294"`, no leading
/// zeros); such keys are listed first, in numeric order, by every JavaScript object.
fn array_index(key: &[u8]) -> Option<u32> {
    let digits = key.get(1..key.len().checked_sub(1)?)?;
    if digits.is_empty()
        || digits.len() > 10
        || (digits.len() > 1 && digits[0] == b'0')
        || !digits.iter().all(u8::is_ascii_digit)
    {
        return None;
    }
    let v: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    (v < u64::from(u32::MAX)).then_some(v as u32)
}

/// Objects up to this many members look for repeated keys by comparing every pair; larger ones
/// use a hash set.
const PAIRWISE_MAX: usize = 16;

fn needs_reorder(out: &[u8], members: &[Member]) -> bool {
    let key = |m: &Member| &out[m.key_start..m.key_end];
    if members.iter().any(|m| array_index(key(m)).is_some()) {
        return true;
    }
    if members.len() <= PAIRWISE_MAX {
        members
            .iter()
            .enumerate()
            .any(|(i, a)| members[..i].iter().any(|b| key(a) == key(b)))
    } else {
        let mut seen = std::collections::HashSet::with_capacity(members.len());
        !members.iter().all(|m| seen.insert(key(m)))
    }
}

/// Rewrites the object written at `out[start..]` in the order a JavaScript object has: array
/// indices first in numeric order, then the other keys in order of first appearance, each with
/// the value it was given last.
fn reorder(out: &mut Vec<u8>, start: usize, members: &[Member]) {
    let written = out[start..].to_vec();
    let local = |at: usize| at - start;
    // Keys are compared in their written (canonical) form, which is one spelling per string.
    let mut slot_of: HashMap<&[u8], usize> = HashMap::with_capacity(members.len());
    let mut kept: Vec<(Option<u32>, std::ops::Range<usize>)> = Vec::with_capacity(members.len());
    for m in members {
        let key = &written[local(m.key_start)..local(m.key_end)];
        let range = local(m.key_start)..local(m.end);
        match slot_of.get(key) {
            Some(&slot) => kept[slot].1 = range,
            None => {
                slot_of.insert(key, kept.len());
                kept.push((array_index(key), range));
            }
        }
    }
    // Stable: non-index keys keep their order.
    kept.sort_by_key(|(index, _)| match index {
        Some(i) => (0, *i),
        None => (1, 0),
    });
    out.truncate(start);
    out.push(b'{');
    for (i, (_, range)) in kept.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&written[range.clone()]);
    }
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(json: &str) -> String {
        canonical(json, 64).unwrap()
    }

    #[test]
    fn strings_get_only_the_escapes_json_stringify_writes() {
        assert_eq!(c(r#""Zo\u00eb""#), "\"Zoë\"");
        assert_eq!(c(r#""a\/b""#), "\"a/b\"");
        assert_eq!(c(r#""\ud83d\ude00 \uD83D\uDE00""#), "\"😀 😀\"");
        assert_eq!(
            c(r#""\u0022\u005c\u0008\u000C\u000a\u000D\u0009""#),
            r#""\"\\\b\f\n\r\t""#
        );
        assert_eq!(
            c(r#""\u0001\u001F\u007f\u2028""#),
            "\"\\u0001\\u001f\u{7f}\u{2028}\""
        );
        assert_eq!(c(r#""\"\\\b\f\n\r\t""#), r#""\"\\\b\f\n\r\t""#);
        // Lone surrogates stay, spelled as JSON.stringify spells them.
        assert_eq!(c(r#""\uD800""#), r#""\ud800""#);
        assert_eq!(c(r#""\uDC00\uD83D""#), r#""\udc00\ud83d""#);
        assert_eq!(c(r#""\uD83D\u0041""#), r#""\ud83dA""#);
        assert_eq!(c(r#""\uD83D\uD83D\uDE00""#), "\"\\ud83d😀\"");
    }

    #[test]
    fn numbers_print_as_javascript_prints_the_double_it_reads() {
        for (input, js) in [
            ("0", "0"),
            ("-0", "0"),
            ("-0.0", "0"),
            ("0e5", "0"),
            ("1.0", "1"),
            ("1E3", "1000"),
            ("1e+3", "1000"),
            ("2.50", "2.5"),
            ("-12", "-12"),
            ("123456789012345", "123456789012345"),
            ("9007199254740993", "9007199254740992"),
            ("12345678901234567890", "12345678901234567000"),
            ("1e21", "1e+21"),
            ("1e20", "100000000000000000000"),
            ("0.000001", "0.000001"),
            ("1e-7", "1e-7"),
            ("0.1", "0.1"),
            ("1.7976931348623157e308", "1.7976931348623157e+308"),
            ("1e400", "null"),
            ("-1e400", "null"),
            ("1e-400", "0"),
            ("5e-324", "5e-324"),
            ("0.30000000000000004", "0.30000000000000004"),
        ] {
            assert_eq!(c(input), js, "{input}");
        }
    }

    #[test]
    fn objects_order_keys_as_a_javascript_object_does() {
        assert_eq!(c(r#"{"b":1,"a":2}"#), r#"{"b":1,"a":2}"#);
        assert_eq!(
            c(r#"{"b":1,"10":2,"a":3,"2":4,"01":5,"-1":6,"4294967294":7,"4294967295":8}"#),
            r#"{"2":4,"10":2,"4294967294":7,"b":1,"a":3,"01":5,"-1":6,"4294967295":8}"#
        );
        assert_eq!(c(r#"{"a":1,"b":2,"a":3}"#), r#"{"a":3,"b":2}"#);
        // "\u0061" is "a": one key.
        assert_eq!(c(r#"{"a":1,"\u0061":{"x":[]}}"#), r#"{"a":{"x":[]}}"#);
        let many: Vec<String> = (0..40).map(|i| format!("\"k{}\":{i}", i % 30)).collect();
        let expected: Vec<String> = (0..30)
            .map(|i| format!("\"k{i}\":{}", if i < 10 { i + 30 } else { i }))
            .collect();
        assert_eq!(
            c(&format!("{{{}}}", many.join(","))),
            format!("{{{}}}", expected.join(","))
        );
        // Nested rebuilds leave the outer object's members intact.
        assert_eq!(
            c(r#"{ "z" : { "1" : 1 , "0" : 0 } , "y" : [ { "b" : 1 , "b" : 2 } ] }"#),
            r#"{"z":{"0":0,"1":1},"y":[{"b":2}]}"#
        );
    }

    #[test]
    fn whitespace_goes_and_bad_input_fails() {
        assert_eq!(
            c(" { \"a b\" : [ 1 , true , false , null , \"[{\" ] }\n"),
            r#"{"a b":[1,true,false,null,"[{"]}"#
        );
        for bad in [
            "",
            "{",
            "{\"a\"}",
            "[1,]",
            "01",
            "1.",
            "1e",
            "-",
            "\"\\x\"",
            "\"\\u12\"",
            "tru",
            "{} x",
            "\"a\u{1}\"",
            "{\"a\":1,}",
            "[1 2]",
        ] {
            assert!(
                matches!(canonical(bad, 64), Err(CanonicalError::Syntax(_))),
                "{bad:?}"
            );
        }
        assert_eq!(canonical("[[[1]]]", 3).as_deref(), Ok("[[[1]]]"));
        assert_eq!(canonical("[[[1]]]", 2), Err(CanonicalError::TooDeep(2)));
        assert_eq!(canonical("{\"a\":{}}", 1), Err(CanonicalError::TooDeep(1)));
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        /// A JSON number token in any spelling: signs, long integers, fractions, exponents.
        fn number() -> impl Strategy<Value = String> {
            (
                any::<bool>(),
                prop_oneof![Just("0".to_string()), "[1-9][0-9]{0,25}"],
                prop::option::of("[0-9]{1,20}"),
                prop::option::of(("[eE]", "[+-]?", "[0-9]{1,3}")),
            )
                .prop_map(|(neg, int, frac, exp)| {
                    let mut s = String::new();
                    if neg {
                        s.push('-');
                    }
                    s.push_str(&int);
                    if let Some(f) = frac {
                        s.push('.');
                        s.push_str(&f);
                    }
                    if let Some((e, sign, d)) = exp {
                        s.push_str(&format!("{e}{sign}{d}"));
                    }
                    s
                })
        }

        /// JSON values with awkward spellings: any escapes, any number forms, repeated and
        /// index-like keys, whitespace.
        fn spelled() -> impl Strategy<Value = String> {
            let string = prop::collection::vec(
                prop_oneof![
                    any::<char>().prop_map(|c| match c {
                        '"' => "\\\"".to_string(),
                        '\\' => "\\\\".to_string(),
                        c if (c as u32) < 0x20 => format!("\\u{:04X}", c as u32),
                        c => c.to_string(),
                    }),
                    any::<u16>().prop_map(|u| format!("\\u{u:04x}")),
                    Just("\\/".to_string()),
                    Just("\\n".to_string()),
                ],
                0..6,
            )
            .prop_map(|parts| format!("\"{}\"", parts.concat()));
            let number = number();
            let key = prop_oneof!["[a-c]", "(0|[1-9][0-9]{0,10})", string.clone(),].prop_map(|k| {
                if k.starts_with('"') {
                    k
                } else {
                    format!("\"{k}\"")
                }
            });
            let leaf = prop_oneof![
                string,
                number,
                Just("true".to_string()),
                Just("null".to_string())
            ];
            leaf.prop_recursive(4, 48, 6, move |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..6)
                        .prop_map(|v| format!("[ {} ]", v.join(" , "))),
                    prop::collection::vec((key.clone(), inner), 0..6).prop_map(|v| {
                        let members: Vec<String> =
                            v.into_iter().map(|(k, v)| format!("{k} :{v}")).collect();
                        format!("{{\n{}}}", members.join(","))
                    }),
                ]
            })
        }

        /// The properties a receiver relies on, checked without JavaScript: the form is a
        /// fixed point (what `JSON.stringify(JSON.parse(body)) === body` amounts to when the
        /// rewriter is JavaScript's), it is valid JSON that reads as the same strings and the
        /// same doubles, and it has no whitespace.
        #[test]
        fn canonical_form_is_a_fixed_point_with_the_same_meaning() {
            proptest!(ProptestConfig::with_cases(2000), |(text in spelled())| {
                let once = canonical(&text, 64).unwrap();
                prop_assert_eq!(&canonical(&once, 64).unwrap(), &once);
                let Ok(original) = serde_json::from_str::<serde_json::Value>(&text) else {
                    // serde_json refuses lone surrogates; the fixed point above still holds.
                    return Ok(());
                };
                let rewritten: serde_json::Value = serde_json::from_str(&once).unwrap();
                prop_assert!(same_meaning(&original, &rewritten), "{} -> {}", text, once);
            });
        }

        /// JavaScript itself as the oracle: node gets a few thousand generated texts and
        /// answers `JSON.stringify(JSON.parse(text))` for each, which must be our form byte for
        /// byte. (node is a test requirement, as for the guide's verifier tests.)
        #[test]
        fn matches_node_json_stringify() {
            use proptest::strategy::ValueTree;
            use std::io::Write;
            let mut runner = proptest::test_runner::TestRunner::deterministic();
            let strategy = spelled();
            let texts: Vec<String> = (0..3000)
                .map(|_| strategy.new_tree(&mut runner).unwrap().current())
                .collect();
            let script = "let s='';process.stdin.on('data',c=>s+=c).on('end',()=>{\
                process.stdout.write(JSON.stringify(JSON.parse(s).map(t=>JSON.stringify(JSON.parse(t)))))})";
            let mut child = std::process::Command::new("node")
                .args(["-e", script])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("node must be installed to run this test");
            let input = serde_json::to_vec(&texts).unwrap();
            child.stdin.take().unwrap().write_all(&input).unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success());
            // node's answer is an array of strings, some with lone surrogates (escaped in
            // this outer JSON): read it without serde_json, which refuses those.
            let answer = String::from_utf8(out.stdout).unwrap();
            let expected = canonical(&answer, 2).unwrap();
            let ours: Vec<String> = texts.iter().map(|t| canonical(t, 64).unwrap()).collect();
            let ours_json = format!(
                "[{}]",
                ours.iter()
                    .map(|o| canonical_string_literal(o))
                    .collect::<Vec<_>>()
                    .join(",")
            );
            if ours_json != expected {
                let theirs = split_top_level_strings(&expected);
                for ((t, o), n) in texts.iter().zip(&ours).zip(&theirs) {
                    assert_eq!(&canonical_string_literal(o), n, "input {t:?}");
                }
                panic!("outputs differ");
            }
        }

        /// `s` as a JSON string literal in `JSON.stringify`'s spelling.
        fn canonical_string_literal(s: &str) -> String {
            // serde_json escapes exactly what JSON.stringify escapes for well-formed text;
            // `s` may hold `\udxxx` escapes already, which are plain ASCII here.
            serde_json::to_string(s).unwrap()
        }

        /// The string literals of a canonical top-level array of strings.
        fn split_top_level_strings(array: &str) -> Vec<String> {
            let mut items = Vec::new();
            let bytes = array.as_bytes();
            let mut i = 1;
            while i < bytes.len() - 1 {
                let start = i;
                i += 1;
                while bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
                items.push(array[start..i].to_string());
                i += 1;
            }
            items
        }

        /// A number reads back as the double its original spelling names (Rust's parser is
        /// correctly rounded, as JavaScript's is), in ECMAScript's shortest form.
        #[test]
        fn numbers_read_back_as_the_same_double() {
            proptest!(ProptestConfig::with_cases(5000), |(text in number())| {
                let read: f64 = text.parse().unwrap();
                let out = canonical(&text, 64).unwrap();
                if read.is_finite() {
                    let back: f64 = out.parse().unwrap();
                    prop_assert!(back == read, "{} -> {}", text, out);
                    prop_assert!(out != "-0" && !out.contains('E'), "{}", out);
                    let mantissa = out.split('e').next().unwrap_or_default();
                    prop_assert!(!mantissa.contains('.') || !mantissa.ends_with('0'), "{}", out);
                    let mut js = ryu_js::Buffer::new();
                    prop_assert_eq!(out.as_str(), js.format(read + 0.0));
                } else {
                    prop_assert_eq!(out, "null");
                }
            });
        }

        /// Equal as JavaScript would read them: numbers as doubles (non-finite ones as null),
        /// objects as maps where the last repeated key wins (serde_json's Value already keeps
        /// the last one).
        fn same_meaning(a: &serde_json::Value, b: &serde_json::Value) -> bool {
            use serde_json::Value as V;
            match (a, b) {
                // serde_json rounds some decimals differently from JavaScript (it lacks
                // `float_roundtrip` here): numbers have their own property below.
                (V::Number(_), V::Number(_)) => true,
                (V::Array(x), V::Array(y)) => {
                    x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_meaning(x, y))
                }
                (V::Object(x), V::Object(y)) => {
                    x.len() == y.len()
                        && x.iter()
                            .all(|(k, v)| y.get(k).is_some_and(|w| same_meaning(v, w)))
                }
                _ => a == b,
            }
        }
    }
}
