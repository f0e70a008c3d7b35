//! The plot of `tollgate tune`: what the sync interval trades, per load shape. The top panel
//! draws the utilization loss (`100% - admitted / ideal`) on an axis zoomed to the losses
//! measured, the bottom one the store round trips per second (all nodes) on a log axis, both
//! against the sync interval on a log axis. Over-admission, which the bound keeps at zero with
//! the default cold start, is stated in the title line (and drawn if any case had some).

use std::collections::BTreeSet;
use std::fmt::Write;

use tollgate::sim::Report;

/// One measured case.
pub struct Case<'a> {
    /// The sync interval.
    pub interval_ms: u16,
    /// The load shape, as the legend names it (`1.5x uniform`).
    pub shape: String,
    /// What the case measured.
    pub report: &'a Report,
}

const WIDTH: f64 = 760.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 170.0;
const PANEL: f64 = 210.0;
const TOP: f64 = 70.0;
const GAP: f64 = 70.0;
const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// A round upper bound for an axis from 0 to `max`, and its tick step (1, 2 or 5 x 10^k).
fn nice(max: f64) -> (f64, f64) {
    let max = if max > 0.0 { max } else { 1.0 };
    let raw = max / 4.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    ((max / step).ceil() * step, step)
}

fn label(v: f64) -> String {
    if v >= 100.0 || v == v.round() {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}").trim_end_matches('0').to_string()
    }
}

/// Where the plot puts things: the sync interval on a log x axis, the utilization loss on a
/// linear axis (top panel), the round trips on a log axis (bottom panel).
struct Scales {
    /// The intervals measured, in increasing order.
    intervals: Vec<u16>,
    plot_w: f64,
    /// The log of the smallest interval, and the span of the logs.
    x0: f64,
    span: f64,
    /// The loss axis: its top and its tick step, in %.
    loss_max: f64,
    loss_step: f64,
    /// The round-trip axis: the decades it spans.
    d0: i32,
    d1: i32,
}

const TOP1: f64 = TOP;
const TOP2: f64 = TOP + PANEL + GAP;

impl Scales {
    /// The scales for `cases`, whose worst over-admission is `worst_over` (% of capacity).
    fn new(cases: &[Case], worst_over: f64) -> Self {
        let intervals: Vec<u16> = cases
            .iter()
            .map(|c| c.interval_ms)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let plot_w = WIDTH - LEFT - RIGHT;
        let lx: Vec<f64> = intervals.iter().map(|&i| f64::from(i).ln()).collect();
        let (x0, x1) = (lx.first().copied().unwrap_or(0.0), lx.last().copied().unwrap_or(1.0));
        let span = if x1 > x0 { x1 - x0 } else { 1.0 };
        let (loss_max, loss_step) = nice(cases.iter().map(|c| loss(c.report)).fold(0.0, f64::max).max(worst_over));

        // Round trips: a log axis over the decades the values span.
        let rts: Vec<f64> = cases
            .iter()
            .map(|c| c.report.round_trips_per_s)
            .filter(|v| *v > 0.0)
            .collect();
        let lo = rts.iter().copied().fold(f64::MAX, f64::min);
        let hi = rts.iter().copied().fold(0.0, f64::max);
        let (d0, d1) = if rts.is_empty() {
            (0, 1)
        } else {
            let (a, b) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
            (a, b.max(a + 1))
        };
        Scales {
            intervals,
            plot_w,
            x0,
            span,
            loss_max,
            loss_step,
            d0,
            d1,
        }
    }

    fn x(&self, interval: u16) -> f64 {
        if self.intervals.len() < 2 {
            LEFT + self.plot_w / 2.0
        } else {
            LEFT + (f64::from(interval).ln() - self.x0) / self.span * self.plot_w
        }
    }

    fn y_loss(&self, v: f64) -> f64 {
        TOP1 + PANEL - v.clamp(0.0, self.loss_max) / self.loss_max * PANEL
    }

    fn y_rt(&self, v: f64) -> f64 {
        let l = v.max(10f64.powi(self.d0)).log10();
        TOP2 + PANEL - (l - f64::from(self.d0)) / f64::from(self.d1 - self.d0) * PANEL
    }

    /// The right edge of the panels.
    fn right(&self) -> f64 {
        LEFT + self.plot_w
    }
}

/// A case's utilization loss in %.
fn loss(r: &Report) -> f64 {
    ((1.0 - r.utilization) * 100.0).max(0.0)
}

/// A case's over-admission in % of `capacity`.
fn over(r: &Report, capacity: u64) -> f64 {
    r.over_admitted as f64 / capacity.max(1) as f64 * 100.0
}

/// The plot as an SVG document.
pub fn svg(title: &str, capacity: u64, cases: &[Case]) -> String {
    let mut shapes: Vec<&str> = Vec::new();
    for c in cases {
        if !shapes.contains(&c.shape.as_str()) {
            shapes.push(&c.shape);
        }
    }
    let worst_over = cases.iter().map(|c| over(c.report, capacity)).fold(0.0, f64::max);
    let sc = Scales::new(cases, worst_over);
    let mut out = header(title, worst_over);
    loss_axis(&mut out, &sc);
    round_trip_axis(&mut out, &sc);
    interval_axes(&mut out, &sc);
    // One line per load shape in each panel, and the legend.
    for (n, shape) in shapes.iter().enumerate() {
        let color = COLORS[n % COLORS.len()];
        let mine: Vec<&Case> = cases.iter().filter(|c| c.shape == *shape).collect();
        series(&mut out, &sc, &mine, color, (worst_over > 0.0).then_some(capacity));
        legend_entry(&mut out, &sc, n, shape, color);
    }
    out += "</svg>\n";
    out
}

/// The document's start: its size, background, title and the over-admission note.
fn header(title: &str, worst_over: f64) -> String {
    let height = TOP + 2.0 * PANEL + GAP + 50.0;
    let mut out = String::new();
    let _ = write!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\
         <text x=\"{LEFT}\" y=\"22\" font-size=\"14\">{}</text>",
        escape(title)
    );
    let over_note = if worst_over == 0.0 {
        "over-admission: 0 in every case".to_string()
    } else {
        format!("worst over-admission: {worst_over:.2}% of capacity (dashed)")
    };
    let _ = write!(out, "<text x=\"{LEFT}\" y=\"40\" fill=\"#555\">{over_note}</text>");
    out
}

/// The top panel's grid, tick labels and heading.
fn loss_axis(out: &mut String, sc: &Scales) {
    let right = sc.right();
    let mut v = 0.0;
    while v <= sc.loss_max + sc.loss_step / 2.0 {
        let y = sc.y_loss(v);
        let _ = write!(
            out,
            "<line x1=\"{LEFT}\" x2=\"{right}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}%</text>",
            LEFT - 6.0,
            y + 4.0,
            label(v)
        );
        v += sc.loss_step;
    }
    let _ = write!(
        out,
        "<text x=\"{LEFT}\" y=\"{:.1}\" font-weight=\"bold\">utilization loss (100% - admitted / ideal)</text>",
        TOP1 - 10.0
    );
}

/// The bottom panel's grid, tick labels and heading.
fn round_trip_axis(out: &mut String, sc: &Scales) {
    let right = sc.right();
    for d in sc.d0..=sc.d1 {
        let y = sc.y_rt(10f64.powi(d));
        let _ = write!(
            out,
            "<line x1=\"{LEFT}\" x2=\"{right}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            LEFT - 6.0,
            y + 4.0,
            label(10f64.powi(d))
        );
    }
    let _ = write!(
        out,
        "<text x=\"{LEFT}\" y=\"{:.1}\" font-weight=\"bold\">store round trips per second, all nodes (log scale)</text>",
        TOP2 - 10.0
    );
}

/// Both panels' frames, the intervals under each, and the x axis' label.
fn interval_axes(out: &mut String, sc: &Scales) {
    let plot_w = sc.plot_w;
    for top in [TOP1, TOP2] {
        let _ = write!(
            out,
            "<rect x=\"{LEFT}\" y=\"{top}\" width=\"{plot_w}\" height=\"{PANEL}\" fill=\"none\" stroke=\"#999\"/>"
        );
        for &i in &sc.intervals {
            let _ = write!(
                out,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{i} ms</text>",
                sc.x(i),
                top + PANEL + 16.0
            );
        }
    }
    let _ = write!(
        out,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">sync interval (log scale)</text>",
        LEFT + plot_w / 2.0,
        TOP2 + PANEL + 36.0
    );
}

/// One load shape's lines: its loss, its over-admission (dashed, when some case had some:
/// `over_of` is then the capacity it is a share of), its round trips.
fn series(out: &mut String, sc: &Scales, mine: &[&Case], color: &str, over_of: Option<u64>) {
    let pts = |f: &dyn Fn(&Case) -> (f64, f64)| mine.iter().map(|c| f(c)).collect::<Vec<_>>();
    *out += &line(
        &pts(&|c| (sc.x(c.interval_ms), sc.y_loss(loss(c.report)))),
        color,
        false,
    );
    if let Some(capacity) = over_of {
        *out += &line(
            &pts(&|c| (sc.x(c.interval_ms), sc.y_loss(over(c.report, capacity)))),
            color,
            true,
        );
    }
    *out += &line(
        &pts(&|c| (sc.x(c.interval_ms), sc.y_rt(c.report.round_trips_per_s))),
        color,
        false,
    );
}

/// The legend's entry for load shape number `n`.
fn legend_entry(out: &mut String, sc: &Scales, n: usize, shape: &str, color: &str) {
    let right = sc.right();
    let y = TOP1 + 14.0 + n as f64 * 18.0;
    let _ = write!(
        out,
        "<line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"{color}\" stroke-width=\"2\"/>\
         <text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
        right + 14.0,
        right + 34.0,
        y - 4.0,
        y - 4.0,
        right + 40.0,
        y,
        escape(shape)
    );
}

fn line(pts: &[(f64, f64)], color: &str, dashed: bool) -> String {
    let p: Vec<String> = pts.iter().map(|(a, b)| format!("{a:.1},{b:.1}")).collect();
    let dash = if dashed { " stroke-dasharray=\"5,4\"" } else { "" };
    let mut s = format!(
        "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"{dash} points=\"{}\"/>",
        p.join(" ")
    );
    for (a, b) in pts {
        let _ = write!(s, "<circle cx=\"{a:.1}\" cy=\"{b:.1}\" r=\"3\" fill=\"{color}\"/>");
    }
    s
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
