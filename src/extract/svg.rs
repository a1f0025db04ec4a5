//! Charts as inline SVG for the dashboard: horizontal bars, columns and a line, scaled to the
//! width of the page, with their numbers written on them so they read without hovering.

use std::fmt::Write;

/// Escape text for HTML and SVG.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn open(w: u32, h: u32, label: &str) -> String {
    format!(
        "<svg viewBox=\"0 0 {w} {h}\" role=\"img\" aria-label=\"{}\" \
         font-family=\"system-ui, sans-serif\" \
         font-size=\"13\">",
        esc(label)
    )
}

/// Horizontal bars, first category on top.
pub fn hbars(
    label: &str,
    categories: &[String],
    values: &[f64],
    color: &str,
    show: &dyn Fn(f64) -> String,
) -> String {
    let (w, row, left, right) = (480u32, 28u32, 92f64, 72f64);
    let h = row * categories.len().max(1) as u32 + 10;
    let max = values
        .iter()
        .copied()
        .fold(0.0, f64::max)
        .max(f64::MIN_POSITIVE);
    let span = w as f64 - left - right;
    let mut s = open(w, h, label);
    for (i, (c, v)) in categories.iter().zip(values).enumerate() {
        let y = 5 + i as u32 * row;
        let len = (v.max(0.0) / max * span).max(1.0);
        let _ = write!(
            s,
            "<text x=\"{:.0}\" y=\"{}\" text-anchor=\"end\" dominant-baseline=\"middle\">{}</text>\
             <rect x=\"{left}\" y=\"{}\" width=\"{len:.1}\" height=\"{}\" fill=\"{color}\" rx=\"2\"/>\
             <text x=\"{:.1}\" y=\"{}\" dominant-baseline=\"middle\">{}</text>",
            left - 8.0,
            y + row / 2,
            esc(c),
            y + 4,
            row - 8,
            left + len + 6.0,
            y + row / 2,
            esc(&show(*v))
        );
    }
    s.push_str("</svg>");
    s
}

/// Vertical columns with the categories below.
pub fn columns(
    label: &str,
    categories: &[String],
    values: &[f64],
    color: &str,
    show: &dyn Fn(f64) -> String,
) -> String {
    let (w, h, top, bottom) = (480f64, 260f64, 24f64, 40f64);
    let n = categories.len().max(1) as f64;
    let slot = w / n;
    // A few categories keep bars of a readable width instead of filling the chart.
    let bar = (slot * 0.7).min(70.0);
    let max = values
        .iter()
        .copied()
        .fold(0.0, f64::max)
        .max(f64::MIN_POSITIVE);
    let span = h - top - bottom;
    let mut s = open(w as u32, h as u32, label);
    let _ = write!(
        s,
        "<line x1=\"0\" y1=\"{0}\" x2=\"{w}\" y2=\"{0}\" stroke=\"#999\"/>",
        h - bottom
    );
    for (i, (c, v)) in categories.iter().zip(values).enumerate() {
        let x = i as f64 * slot + (slot - bar) / 2.0;
        let len = (v.max(0.0) / max * span).max(1.0);
        let y = h - bottom - len;
        let mid = x + bar / 2.0;
        let _ = write!(
            s,
            "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{bar:.1}\" height=\"{len:.1}\" \
             fill=\"{color}\" rx=\"2\"/>\
             <text x=\"{mid:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"12\">{}</text>\
             <text x=\"{mid:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"11\">{}</text>",
            y - 5.0,
            esc(&show(*v)),
            h - bottom + 18.0,
            esc(c)
        );
    }
    s.push_str("</svg>");
    s
}

/// A line through (x, y) points: x from 0 to 100 (percent of customers), y a share 0..1.
pub fn share_curve(label: &str, xs: &[f64], ys: &[f64], color: &str, x_title: &str) -> String {
    let (w, h, left, bottom, top, right) = (480f64, 280f64, 44f64, 40f64, 12f64, 14f64);
    let px = |x: f64| left + x / 100.0 * (w - left - right);
    let py = |y: f64| h - bottom - y.clamp(0.0, 1.0) * (h - top - bottom);
    let mut s = open(w as u32, h as u32, label);
    for tick in [0.0, 0.2, 0.4, 0.6, 0.8, 1.0] {
        let _ = write!(
            s,
            "<line x1=\"{left}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#e3e3e3\"/>\
             <text x=\"{:.1}\" y=\"{y:.1}\" text-anchor=\"end\" dominant-baseline=\"middle\" \
             font-size=\"11\">{:.0}%</text>",
            w - right,
            left - 6.0,
            tick * 100.0,
            y = py(tick)
        );
    }
    for tick in [0.0, 20.0, 40.0, 60.0, 80.0, 100.0] {
        let _ = write!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"11\">{tick:.0}%</text>",
            px(tick),
            h - bottom + 16.0
        );
    }
    let _ = write!(
        s,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"12\">{}</text>",
        left + (w - left - right) / 2.0,
        h - 6.0,
        esc(x_title)
    );
    let points: Vec<String> = std::iter::once((0.0, 0.0))
        .chain(xs.iter().copied().zip(ys.iter().copied()))
        .map(|(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
        .collect();
    let _ = write!(
        s,
        "<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2.5\"/>",
        points.join(" ")
    );
    // Mark where 80% of revenue is reached.
    if let Some((x, y)) = xs.iter().zip(ys).find(|(_, y)| **y >= 0.8) {
        let _ = write!(
            s,
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"{color}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\">{x:.0}% of customers bring {:.0}%</text>",
            px(*x),
            py(*y),
            px(*x) + 8.0,
            py(*y) + 16.0,
            y * 100.0
        );
    }
    s.push_str("</svg>");
    s
}
