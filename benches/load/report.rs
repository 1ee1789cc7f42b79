//! The bench's one report: every phase puts its figures into a [`Report`] as named, typed
//! values ([`Val`]), and the same values render both the human table and the `--json` object,
//! so no figure is formatted twice by hand.
//!
//! A [`Section`] is one block of the table (a `[title]` line and its rows) and one JSON object
//! placed by its [`Place`]: merged into the root, under a key, or appended to an array. A row
//! has a label, a value cell and a note cell; each cell is text interleaved with figures
//! ([`Cell`]), and every figure carries its JSON key (dots nest: `probe.events`).

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{json, Map, Value};

/// Percentiles of a latency sample, in milliseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pcts {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub n: usize,
}

impl Pcts {
    /// Nearest-rank percentiles of `v` (any order).
    pub fn of(mut v: Vec<Duration>) -> Pcts {
        if v.is_empty() {
            return Pcts::default();
        }
        v.sort_unstable();
        let at = |q: f64| {
            let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
            v[i].as_secs_f64() * 1e3
        };
        Pcts {
            p50: at(0.50),
            p99: at(0.99),
            p999: at(0.999),
            max: v[v.len() - 1].as_secs_f64() * 1e3,
            n: v.len(),
        }
    }
}

/// Which percentiles a [`Val::Pcts`] shows in the table (JSON always has all of them).
#[derive(Debug, Clone, Copy)]
pub enum Shown {
    /// `p50 / p99 / p99.9 ms (max M)`
    Tail,
    /// `p50 / p99 / max ms`
    Max,
    /// `p50 / p99 ms`
    Two,
}

/// One figure: how it reads in the table and what it is in JSON.
#[derive(Debug, Clone)]
pub enum Val {
    /// A count: `12,345`; JSON integer.
    Int(u64),
    /// A rate or large quantity, rounded, with thousands separators; JSON float.
    Num(f64),
    /// A number with `n` decimals; JSON float.
    Dec(f64, usize),
    /// Milliseconds with `n` decimals: `1.25 ms`; JSON float (key should end in `_ms`).
    Ms(f64, usize),
    /// Seconds with `n` decimals: `3.4 s`; JSON float.
    Secs(f64, usize),
    /// Bytes shown in MiB with `n` decimals; JSON integer bytes.
    Mib(u64, usize),
    /// A fraction shown as a whole percentage; JSON fraction.
    Percent(f64),
    /// A yes/no verdict with the words to show for each; JSON bool.
    Flag(bool, &'static str, &'static str),
    /// Free text; JSON string.
    Text(String),
    Pcts(Pcts, usize, Shown),
    /// Counts per second shown in thousands with one decimal; JSON array of integers.
    Series(Vec<u64>),
    /// Values joined by `sep`; JSON array.
    List(Vec<Val>, &'static str),
    /// Absent: `—`; JSON null.
    None,
}

impl Val {
    pub fn opt(v: Option<Val>) -> Val {
        v.unwrap_or(Val::None)
    }

    pub fn human(&self) -> String {
        match self {
            Val::Int(n) => thousands(*n as f64),
            Val::Num(x) => thousands(*x),
            Val::Dec(x, d) => format!("{x:.d$}"),
            Val::Ms(x, d) => format!("{x:.d$} ms"),
            Val::Secs(x, d) => format!("{x:.d$} s"),
            Val::Mib(b, d) => format!("{:.d$} MiB", *b as f64 / 1048576.0),
            Val::Percent(f) => format!("{:.0}%", f * 100.0),
            Val::Flag(b, yes, no) => (if *b { yes } else { no }).to_string(),
            Val::Text(s) => s.clone(),
            Val::Pcts(p, _, _) if p.n == 0 => "— (no samples)".to_string(),
            Val::Pcts(p, d, Shown::Tail) => format!(
                "{:.d$} / {:.d$} / {:.d$} ms (max {:.1})",
                p.p50, p.p99, p.p999, p.max
            ),
            Val::Pcts(p, d, Shown::Max) => {
                format!("{:.d$} / {:.d$} / {:.d$} ms", p.p50, p.p99, p.max)
            }
            Val::Pcts(p, d, Shown::Two) => format!("{:.d$} / {:.d$} ms", p.p50, p.p99),
            Val::Series(v) => v
                .iter()
                .map(|n| format!("{:.1}", *n as f64 / 1000.0))
                .collect::<Vec<_>>()
                .join(" "),
            Val::List(v, sep) => v.iter().map(Val::human).collect::<Vec<_>>().join(sep),
            Val::None => "—".to_string(),
        }
    }

    pub fn json(&self) -> Value {
        match self {
            Val::Int(n) => json!(n),
            Val::Num(x) | Val::Dec(x, _) | Val::Ms(x, _) | Val::Secs(x, _) | Val::Percent(x) => {
                json!(x)
            }
            Val::Mib(b, _) => json!(b),
            Val::Flag(b, _, _) => json!(b),
            Val::Text(s) => json!(s),
            Val::Pcts(p, _, _) => {
                json!({"p50": p.p50, "p99": p.p99, "p999": p.p999, "max": p.max, "n": p.n})
            }
            Val::Series(v) => json!(v),
            Val::List(v, _) => Value::Array(v.iter().map(Val::json).collect()),
            Val::None => Value::Null,
        }
    }
}

/// `12345.6` → `12,346`.
fn thousands(x: f64) -> String {
    // A difference of two equal counters can be -0.0, which reads "-0".
    let x = if x.abs() < 0.5 { 0.0 } else { x };
    let s = format!("{x:.0}");
    let (neg, digits) = s
        .strip_prefix('-')
        .map_or((false, s.as_str()), |d| (true, d));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if neg {
        format!("-{out}")
    } else {
        out
    }
}

#[derive(Debug, Clone)]
enum Part {
    Text(String),
    Fig(String, Val),
}

/// Text interleaved with named figures: one table cell.
#[derive(Debug, Clone, Default)]
pub struct Cell(Vec<Part>);

impl Cell {
    pub fn new() -> Cell {
        Cell::default()
    }
    /// A cell holding one figure.
    pub fn fig(key: impl Into<String>, v: Val) -> Cell {
        Cell::new().f(key, v)
    }
    /// A cell holding text only.
    pub fn text(s: impl Into<String>) -> Cell {
        Cell::new().t(s)
    }
    pub fn t(mut self, s: impl Into<String>) -> Cell {
        self.0.push(Part::Text(s.into()));
        self
    }
    pub fn f(mut self, key: impl Into<String>, v: Val) -> Cell {
        self.0.push(Part::Fig(key.into(), v));
        self
    }
    /// Appends `; refused N [429xA 503xB]; io errors M` (the statuses and the io errors only
    /// when there are any): the load generator's refusals as every phase shows them.
    pub fn refusals(self, refused: u64, statuses: &str, io_errors: u64) -> Cell {
        self.t("; refused ")
            .f("refused", Val::Int(refused))
            .when(
                !statuses.is_empty(),
                Cell::text(" [")
                    .f("refused_statuses", Val::Text(statuses.to_string()))
                    .t("]"),
            )
            .when(
                io_errors > 0,
                Cell::text("; io errors ").f("io_errors", Val::Int(io_errors)),
            )
    }
    /// Appends `other` if `cond` (optional detail, e.g. error counts that are usually 0).
    pub fn when(mut self, cond: bool, other: Cell) -> Cell {
        if cond {
            self.0.extend(other.0);
        }
        self
    }
    fn human(&self) -> String {
        self.0
            .iter()
            .map(|p| match p {
                Part::Text(s) => s.clone(),
                Part::Fig(_, v) => v.human(),
            })
            .collect()
    }
    fn figures(&self) -> impl Iterator<Item = (&str, &Val)> {
        self.0.iter().filter_map(|p| match p {
            Part::Fig(k, v) => Some((k.as_str(), v)),
            Part::Text(_) => None,
        })
    }
}

impl From<&str> for Cell {
    fn from(s: &str) -> Cell {
        Cell::text(s)
    }
}

impl From<String> for Cell {
    fn from(s: String) -> Cell {
        Cell::text(s)
    }
}

struct Row {
    label: String,
    value: Cell,
    note: Cell,
}

/// Where a section's figures go in the JSON object.
#[derive(Debug, Clone)]
pub enum Place {
    Root,
    Key(String),
    /// Appended to the array under this key.
    Item(String),
}

pub struct Section {
    title: Cell,
    place: Place,
    skipped: bool,
    rows: Vec<Row>,
}

impl Section {
    pub fn row(&mut self, label: impl Into<String>, value: Cell, note: Cell) -> &mut Section {
        self.rows.push(Row {
            label: label.into(),
            value,
            note,
        });
        self
    }

    fn json(&self) -> Value {
        let mut obj = Map::new();
        if self.skipped {
            obj.insert("skipped".into(), json!(true));
        }
        let cells = self.rows.iter().flat_map(|r| [&r.value, &r.note]);
        for cell in std::iter::once(&self.title).chain(cells) {
            for (key, val) in cell.figures() {
                insert_path(&mut obj, key, val.json());
            }
        }
        Value::Object(obj)
    }
}

/// Inserts `v` at a dotted `path` (`probe.events`), creating objects on the way.
fn insert_path(obj: &mut Map<String, Value>, path: &str, v: Value) {
    match path.split_once('.') {
        None => {
            obj.insert(path.to_string(), v);
        }
        Some((head, rest)) => {
            let inner = obj
                .entry(head.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(m) = inner {
                insert_path(m, rest, v);
            }
        }
    }
}

#[derive(Default)]
pub struct Report {
    sections: Vec<Section>,
}

impl Report {
    /// A new section; figures in its `title` go into its JSON object too.
    pub fn section(&mut self, title: impl Into<Cell>, place: Place) -> &mut Section {
        self.sections.push(Section {
            title: title.into(),
            place,
            skipped: false,
            rows: Vec::new(),
        });
        self.sections.last_mut().expect("just pushed")
    }

    /// A phase that did not run: its title with `: skipped`, `"skipped": true` in JSON.
    pub fn skipped(&mut self, title: impl Into<Cell>, place: Place) {
        self.section(title, place).skipped = true;
    }

    /// The human table: `[title]` lines and `label  value  note` rows, columns aligned.
    pub fn table(&self) -> String {
        let rows: Vec<[String; 3]> = self
            .sections
            .iter()
            .flat_map(|s| s.rows.iter())
            .map(|r| [r.label.clone(), r.value.human(), r.note.human()])
            .collect();
        let w0 = rows.iter().map(|r| r[0].chars().count()).max().unwrap_or(0);
        let w1 = rows.iter().map(|r| r[1].chars().count()).max().unwrap_or(0);
        let mut out = String::new();
        let mut rows = rows.into_iter();
        for s in &self.sections {
            let _ = writeln!(
                out,
                "[{}{}]",
                s.title.human(),
                if s.skipped { ": skipped" } else { "" }
            );
            for _ in &s.rows {
                let r = rows.next().expect("one rendered row per row");
                let line = format!("  {:<w0$}  {:>w1$}  {}", r[0], r[1], r[2]);
                let _ = writeln!(out, "{}", line.trim_end());
            }
        }
        out
    }

    /// The JSON object: each section's figures at its [`Place`].
    pub fn json(&self) -> Value {
        let mut root = Map::new();
        for s in &self.sections {
            let Value::Object(obj) = s.json() else {
                continue;
            };
            match &s.place {
                Place::Root => root.extend(obj),
                Place::Key(k) => {
                    root.insert(k.clone(), Value::Object(obj));
                }
                Place::Item(k) => {
                    let arr = root
                        .entry(k.clone())
                        .or_insert_with(|| Value::Array(Vec::new()));
                    if let Value::Array(a) = arr {
                        a.push(Value::Object(obj));
                    }
                }
            }
        }
        Value::Object(root)
    }
}
