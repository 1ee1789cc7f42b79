//! Server-rendered SVG charts for the dashboard: the geometry of stacked bar charts, line
//! charts and sparklines, computed here as plain numbers and class names, and drawn by the
//! templates (`templates/charts.html`) as `<svg role="img">` with a text alternative.
//!
//! Data enters as series of numbers with their labels (built by `screens` from the same domain
//! values the JSON API returns: `domain::stats`, over [`crate::stats`]); it leaves as view
//! structs whose fields are coordinates already formatted. Colours come from CSS classes (the
//! CSP allows no inline style), and every bar carries its numbers in `data-*` attributes and a
//! `<title>`, so a test and a pointer read the same values the table beside the chart shows.

/// The drawing area of a full-width chart, in SVG units (the SVG scales to its box).
const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 200.0;
/// Room on the left for the y-axis labels, and below for the x-axis labels.
const LEFT: f64 = 44.0;
const BOTTOM: f64 = 22.0;
const TOP: f64 = 8.0;

fn f(v: f64) -> String {
    format!("{v:.1}")
}

/// A "nice" axis maximum at or above `max` (1, 2, 2.5 or 5 × a power of ten), and its ticks.
fn nice_axis(max: f64) -> (f64, Vec<f64>) {
    if max <= 0.0 {
        return (1.0, vec![0.0, 1.0]);
    }
    let raw = max / 4.0;
    let pow = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * pow)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * pow);
    let top = (max / step).ceil() * step;
    let n = (top / step).round() as usize;
    (top, (0..=n).map(|i| i as f64 * step).collect())
}

fn tick_label(v: f64) -> String {
    if v >= 1_000_000.0 {
        format!("{}M", trim(v / 1_000_000.0))
    } else if v >= 10_000.0 {
        format!("{}k", trim(v / 1000.0))
    } else {
        trim(v)
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

pub struct Tick {
    pub y: String,
    pub label: String,
}

pub struct XLabel {
    pub x: String,
    pub label: String,
}

/// One rectangle of a stacked bar.
pub struct Segment {
    pub y: String,
    pub h: String,
    pub class: &'static str,
}

/// One bar: its segments bottom-up, and its numbers.
pub struct Bar {
    pub x: String,
    pub w: String,
    pub title: String,
    pub segments: Vec<Segment>,
    /// (name, value) pairs written as `data-{name}` attributes.
    pub data: Vec<(&'static str, String)>,
}

/// A series' legend entry.
pub struct Legend {
    pub class: &'static str,
    pub label: String,
}

/// Frame shared by both chart kinds.
pub struct Frame {
    pub id: String,
    pub width: String,
    pub height: String,
    pub plot_left: String,
    pub plot_right: String,
    /// Where the y-axis labels end.
    pub tick_x: String,
    pub baseline: String,
    pub label_y: String,
    /// The text alternative (also the SVG's `<desc>`).
    pub description: String,
    pub title: String,
    pub ticks: Vec<Tick>,
    pub x_labels: Vec<XLabel>,
    pub legend: Vec<Legend>,
}

pub struct StackedChart {
    pub frame: Frame,
    pub bars: Vec<Bar>,
}

pub struct Line {
    pub class: &'static str,
    pub points: String,
    /// Points that stand alone (no neighbour with a value): drawn as dots.
    pub dots: Vec<(String, String)>,
}

pub struct LineChart {
    pub frame: Frame,
    pub lines: Vec<Line>,
}

/// A series of a chart: its CSS class, legend label, and one value per bucket (`None`: no
/// value, e.g. no attempt to time).
pub struct Series {
    pub class: &'static str,
    pub key: &'static str,
    pub label: String,
    pub values: Vec<Option<f64>>,
}

fn frame(
    id: &str,
    title: &str,
    description: String,
    max: f64,
    labels: &[String],
    every: usize,
    series: &[Series],
) -> (Frame, f64) {
    let (top, ticks) = nice_axis(max);
    let plot_h = HEIGHT - TOP - BOTTOM;
    let baseline = TOP + plot_h;
    let n = labels.len().max(1) as f64;
    let slot = (WIDTH - LEFT) / n;
    let frame = Frame {
        id: id.to_string(),
        width: f(WIDTH),
        height: f(HEIGHT),
        plot_left: f(LEFT),
        plot_right: f(WIDTH),
        tick_x: f(LEFT - 6.0),
        baseline: f(baseline),
        label_y: f(HEIGHT - 6.0),
        description,
        title: title.to_string(),
        ticks: ticks
            .iter()
            .map(|t| Tick {
                y: f(baseline - t / top * plot_h),
                label: tick_label(*t),
            })
            .collect(),
        x_labels: labels
            .iter()
            .enumerate()
            .filter(|(i, _)| i % every.max(1) == 0)
            .map(|(i, l)| XLabel {
                x: f(LEFT + slot * (i as f64 + 0.5)),
                label: l.clone(),
            })
            .collect(),
        legend: series
            .iter()
            .map(|s| Legend {
                class: s.class,
                label: s.label.clone(),
            })
            .collect(),
    };
    (frame, top)
}

/// A stacked bar chart: one bar per label, the series stacked bottom-up in the order given.
/// `titles` is each bar's hover text.
pub fn stacked(
    id: &str,
    title: &str,
    description: String,
    labels: &[String],
    every: usize,
    series: &[Series],
    titles: Vec<String>,
) -> StackedChart {
    let totals: Vec<f64> = (0..labels.len())
        .map(|i| {
            series
                .iter()
                .map(|s| s.values.get(i).copied().flatten().unwrap_or(0.0))
                .sum()
        })
        .collect();
    let max = totals.iter().copied().fold(0.0, f64::max);
    let (frame, top) = frame(id, title, description, max, labels, every, series);
    let plot_h = HEIGHT - TOP - BOTTOM;
    let baseline = TOP + plot_h;
    let slot = (WIDTH - LEFT) / labels.len().max(1) as f64;
    let bars = titles
        .into_iter()
        .enumerate()
        .map(|(i, title)| {
            let mut y = baseline;
            let mut segments = Vec::new();
            let mut data = Vec::new();
            for s in series {
                let v = s.values.get(i).copied().flatten().unwrap_or(0.0);
                data.push((s.key, trim(v)));
                if v <= 0.0 {
                    continue;
                }
                // At least a pixel, so that a single failure among thousands is visible.
                let h = (v / top * plot_h).max(1.5);
                y -= h;
                segments.push(Segment {
                    y: f(y),
                    h: f(h),
                    class: s.class,
                });
            }
            Bar {
                x: f(LEFT + slot * i as f64 + slot * 0.15),
                w: f(slot * 0.7),
                title,
                segments,
                data,
            }
        })
        .collect();
    StackedChart { frame, bars }
}

/// A line chart: one polyline per series over the labels; gaps where a value is `None`.
pub fn lines(
    id: &str,
    title: &str,
    description: String,
    labels: &[String],
    every: usize,
    series: &[Series],
) -> LineChart {
    let max = series
        .iter()
        .flat_map(|s| s.values.iter().flatten())
        .copied()
        .fold(0.0, f64::max);
    let (frame, top) = frame(id, title, description, max, labels, every, series);
    let plot_h = HEIGHT - TOP - BOTTOM;
    let baseline = TOP + plot_h;
    let slot = (WIDTH - LEFT) / labels.len().max(1) as f64;
    let lines = series
        .iter()
        .map(|s| {
            let point = |i: usize, v: f64| {
                (
                    f(LEFT + slot * (i as f64 + 0.5)),
                    f(baseline - v / top * plot_h),
                )
            };
            let mut points = Vec::new();
            let mut dots = Vec::new();
            for (i, v) in s.values.iter().enumerate() {
                let Some(v) = v else { continue };
                let prev = i > 0 && s.values[i - 1].is_some();
                let next = s.values.get(i + 1).is_some_and(Option::is_some);
                let (x, y) = point(i, *v);
                if !prev && !next {
                    dots.push((x.clone(), y.clone()));
                }
                // A gap starts a new run: "M" moves without drawing.
                points.push(format!("{}{x},{y}", if prev { "L" } else { "M" }));
            }
            Line {
                class: s.class,
                points: points.join(" "),
                dots,
            }
        })
        .collect();
    LineChart { frame, lines }
}

/// A small bar sparkline (no axes): bars of `values` scaled to the largest, each split into
/// its good part and its bad part (`bad[i]` ≤ `values[i]`).
pub struct Sparkline {
    pub bars: Vec<SparkBar>,
    pub label: String,
}

pub struct SparkBar {
    pub x: String,
    pub y: String,
    pub w: String,
    pub h: String,
    /// The failed part, drawn over the top of the bar (`None`: nothing failed).
    pub bad: Option<(String, String)>,
}

pub fn sparkline(values: &[u64], bad: &[u64], label: String) -> Sparkline {
    const W: f64 = 120.0;
    const H: f64 = 24.0;
    let max = values.iter().copied().max().unwrap_or(0).max(1) as f64;
    let slot = W / values.len().max(1) as f64;
    let bars = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let h = if *v == 0 {
                0.0
            } else {
                (*v as f64 / max * H).max(1.5)
            };
            let b = bad.get(i).copied().unwrap_or(0).min(*v);
            let bh = (h * b as f64 / (*v).max(1) as f64).max(1.0);
            SparkBar {
                x: f(slot * i as f64),
                y: f(H - h),
                w: f(slot * 0.8),
                h: f(h),
                bad: (b > 0).then(|| (f(H - h), f(bh))),
            }
        })
        .collect();
    Sparkline { bars, label }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_end_on_round_numbers_at_or_above_the_maximum() {
        assert_eq!(nice_axis(0.0).0, 1.0);
        assert_eq!(nice_axis(7.0), (8.0, vec![0.0, 2.0, 4.0, 6.0, 8.0]));
        assert_eq!(nice_axis(95.0).0, 100.0);
        assert_eq!(nice_axis(1234.0).0, 1500.0);
        assert_eq!(tick_label(25_000.0), "25k");
        assert_eq!(tick_label(2.5), "2.5");
    }

    #[test]
    fn bars_stack_in_order_and_carry_their_numbers() {
        let series = [
            Series {
                class: "ok",
                key: "delivered",
                label: "Delivered".into(),
                values: vec![Some(3.0), Some(0.0)],
            },
            Series {
                class: "bad",
                key: "failed",
                label: "Failed".into(),
                values: vec![Some(1.0), None],
            },
        ];
        let c = stacked(
            "c",
            "t",
            "d".into(),
            &["a".into(), "b".into()],
            1,
            &series,
            vec!["a".into(), "b".into()],
        );
        assert_eq!(c.bars.len(), 2);
        assert_eq!(c.bars[0].segments.len(), 2);
        assert_eq!(c.bars[0].segments[0].class, "ok");
        let bottom: f64 = c.bars[0].segments[0].y.parse().unwrap();
        let upper: f64 = c.bars[0].segments[1].y.parse().unwrap();
        assert!(upper < bottom, "the second series sits on the first");
        assert_eq!(
            c.bars[0].data,
            vec![("delivered", "3".to_string()), ("failed", "1".to_string())]
        );
        assert!(c.bars[1].segments.is_empty());
        let l = lines(
            "l",
            "t",
            "d".into(),
            &["a".into(), "b".into(), "c".into()],
            1,
            &[Series {
                class: "p50",
                key: "p50",
                label: "p50".into(),
                values: vec![Some(1.0), None, Some(2.0)],
            }],
        );
        assert_eq!(l.lines[0].dots.len(), 2, "isolated points are dots");
        assert!(l.lines[0].points.starts_with('M'));
    }
}
