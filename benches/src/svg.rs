//! The `--svg` chart: one small panel per metric, a bar per implementation,
//! hand-written SVG with no dependencies.
//!
//! Metrics have different units, so bars of different metrics never share an
//! axis: each panel has its own y axis from zero (a bar chart that does not
//! start at zero misleads), gridlines at round values, and the value printed
//! on every bar so nobody has to read it off the axis. Colours are fixed per
//! implementation and explained by one legend at the top.

use std::fmt::Write as _;

use crate::report::{Metric, Report};

/// Panels in the chart, in order, when the report has them.
const PANELS: [Metric; 8] = [
    Metric::Tcp1,
    Metric::Tcp4,
    Metric::Udp64Pps,
    Metric::Udp1400Pps,
    Metric::LatIdleP99,
    Metric::LatLoadP50,
    Metric::LatLoadP99,
    Metric::CpuPerGb,
];

/// Colour-blind-safe palette (Okabe-Ito), one per implementation in order.
const COLOURS: [&str; 8] = [
    "#999999", "#D55E00", "#0072B2", "#56B4E9", "#009E73", "#E69F00", "#CC79A7", "#F0E442",
];

const PANEL_W: f64 = 300.0;
const PANEL_H: f64 = 290.0;
const COLS: usize = 4;
const TOP: f64 = 90.0;

/// Escapes text for an XML text node or attribute.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A round axis maximum >= `v` (1, 2, 2.5 or 5 times a power of ten).
pub fn nice_max(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * p >= v {
            return m * p;
        }
    }
    10.0 * p
}

fn short(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// An axis tick: as many decimals as the axis' step needs, no more.
fn tick(v: f64, max: f64) -> String {
    let step = max / 4.0;
    if step >= 1.0 && step.fract() == 0.0 {
        format!("{v:.0}")
    } else if (step * 10.0).fract() == 0.0 {
        format!("{v:.1}")
    } else if (step * 100.0).fract() == 0.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// The value of a metric in the unit the panel shows (kpps for rates).
fn shown(m: Metric, v: f64) -> f64 {
    match m {
        Metric::Udp64Pps | Metric::Udp1400Pps => v / 1e3,
        _ => v,
    }
}

/// Renders the chart.
pub fn render(report: &Report, title: &str) -> String {
    let impls: Vec<_> = report.available().collect();
    let panels: Vec<Metric> = PANELS
        .into_iter()
        .filter(|m| impls.iter().any(|i| i.median(*m).is_some()))
        .collect();
    let rows = panels.len().div_ceil(COLS).max(1);
    let width = PANEL_W * COLS as f64 + 20.0;
    let height = TOP + PANEL_H * rows as f64 + 20.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="10" y="22" font-size="16" font-weight="bold">{}</text>"#,
        escape(title)
    );
    // Legend.
    let mut x = 10.0;
    for (k, i) in impls.iter().enumerate() {
        let c = COLOURS[k % COLOURS.len()];
        let _ = writeln!(
            s,
            r#"<rect x="{x}" y="40" width="14" height="14" fill="{c}"/><text x="{}" y="51" font-size="12">{}</text>"#,
            x + 18.0,
            escape(&i.name)
        );
        x += 30.0 + 7.0 * i.name.len() as f64;
    }
    let _ = writeln!(
        s,
        r##"<text x="10" y="74" fill="#555">medians of the runs; each panel has its own axis from zero</text>"##
    );
    for (p, m) in panels.iter().enumerate() {
        let ox = 10.0 + PANEL_W * (p % COLS) as f64;
        let oy = TOP + PANEL_H * (p / COLS) as f64;
        panel(&mut s, ox, oy, *m, &impls);
    }
    s.push_str("</svg>\n");
    s
}

fn panel(s: &mut String, ox: f64, oy: f64, m: Metric, impls: &[&crate::report::ImplResult]) {
    // Plot area inside the panel.
    let (left, right, top, bottom) = (
        ox + 55.0,
        ox + PANEL_W - 15.0,
        oy + 34.0,
        oy + PANEL_H - 85.0,
    );
    let values: Vec<Option<f64>> = impls
        .iter()
        .map(|i| i.median(m).map(|v| shown(m, v)))
        .collect();
    let max = nice_max(values.iter().flatten().copied().fold(0.0, f64::max));
    let better = if m.higher_is_better() {
        "higher is better"
    } else {
        "lower is better"
    };
    let _ = writeln!(
        s,
        r##"<text x="{}" y="{}" font-size="13" font-weight="bold" text-anchor="middle">{}</text><text x="{}" y="{}" fill="#555" text-anchor="middle">{better}</text>"##,
        (left + right) / 2.0,
        oy + 12.0,
        escape(m.title()),
        (left + right) / 2.0,
        oy + 25.0,
    );
    // Y axis: gridlines and ticks at quarters of a round maximum.
    for k in 0..=4 {
        let v = max * f64::from(k) / 4.0;
        let y = bottom - (bottom - top) * f64::from(k) / 4.0;
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{y}" x2="{right}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
            left - 4.0,
            y + 4.0,
            tick(v, max)
        );
    }
    let unit = m.unit();
    let cy = (top + bottom) / 2.0;
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{cy}" text-anchor="middle" transform="rotate(-90 {} {cy})">{}</text>"#,
        ox + 12.0,
        ox + 12.0,
        escape(unit)
    );
    let _ = writeln!(
        s,
        r#"<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="black"/><line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="black"/>"#
    );
    let n = impls.len().max(1) as f64;
    let slot = (right - left) / n;
    let bw = slot * 0.7;
    for (k, (i, v)) in impls.iter().zip(&values).enumerate() {
        let x = left + slot * k as f64 + (slot - bw) / 2.0;
        let c = COLOURS[k % COLOURS.len()];
        let label_x = x + bw / 2.0;
        match v {
            Some(v) => {
                let h = (bottom - top) * (v / max).clamp(0.0, 1.0);
                let _ = writeln!(
                    s,
                    r#"<rect x="{x:.1}" y="{:.1}" width="{bw:.1}" height="{h:.1}" fill="{c}"><title>{}: {}</title></rect><text x="{label_x:.1}" y="{:.1}" text-anchor="middle" font-size="10">{}</text>"#,
                    bottom - h,
                    escape(&i.name),
                    short(*v),
                    bottom - h - 3.0,
                    short(*v)
                );
            }
            None => {
                let _ = writeln!(
                    s,
                    r##"<text x="{label_x:.1}" y="{:.1}" text-anchor="middle" font-size="10" fill="#777">n/a</text>"##,
                    bottom - 3.0
                );
            }
        }
        // Category label under the bar, slanted so long names fit.
        let ly = bottom + 12.0;
        let _ = writeln!(
            s,
            r#"<text x="{label_x:.1}" y="{ly:.1}" text-anchor="end" font-size="9" transform="rotate(-30 {label_x:.1} {ly:.1})">{}</text>"#,
            escape(&i.name)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_axis_maxima() {
        assert_eq!(nice_max(17.0), 20.0);
        assert_eq!(nice_max(2.2), 2.5);
        assert_eq!(nice_max(0.47), 0.5);
        assert_eq!(nice_max(100.0), 100.0);
        assert_eq!(nice_max(0.0), 1.0);
        assert_eq!(tick(7500.0, 10000.0), "7500");
        assert_eq!(tick(12.5, 50.0), "12.5");
        assert_eq!(tick(0.625, 2.5), "0.625");
    }

    #[test]
    fn svg_is_well_formed_and_names_everyone() {
        let mut r = crate::report::tests::sample();
        r.implementations[0].name = "a<b>&\"c".into();
        let svg = render(&r, "nsm-bench & friends");
        let doc = roxmltree::Document::parse(&svg).expect("well-formed XML");
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        let texts: Vec<&str> = doc.descendants().filter_map(|n| n.text()).collect();
        for name in ["a<b>&\"c", "nsm-rs"] {
            assert!(texts.contains(&name), "{name} missing from {texts:?}");
        }
        // An implementation that was not measured is not drawn.
        assert!(!texts.contains(&"gotatun"));
        // Values are printed on the bars.
        assert!(
            texts.contains(&"17.0") && texts.contains(&"5.00"),
            "{texts:?}"
        );
    }
}
