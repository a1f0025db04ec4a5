//! The dashboard: one self-contained HTML file. No script, no font, no image fetched: charts
//! are inline SVG and a Content-Security-Policy forbids the page any request. It reflows from
//! a laptop to a phone and prints to PDF with one section per page.

use std::fmt::Write;

use super::pack::{Cell, ColumnKind, Pack, PackTable, group_digits};
use super::svg::{self, esc};

const ACCENT: &str = "#1f4e79";
const RED: &str = "#c0392b";
const AMBER: &str = "#d68910";

const STYLE: &str = "
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif;
  color: #1d2329; background: #f4f6f8; }
header { background: #1f4e79; color: #fff; padding: 20px 24px; }
header h1 { margin: 0 0 4px; font-size: 1.6em; }
header p { margin: 0; opacity: .9; }
main { max-width: 1180px; margin: 0 auto; padding: 16px; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(165px, 1fr)); gap: 12px; }
.card { background: #fff; border-radius: 8px; padding: 12px 14px; box-shadow: 0 1px 3px #0002; }
.card .label { font-size: .85em; color: #555; }
.card .value { font-size: 1.55em; font-weight: 650; margin: 2px 0; }
.card .change { font-size: .85em; }
.good { color: #1e8449; } .bad { color: #c0392b; } .flat { color: #666; }
section { background: #fff; border-radius: 8px; padding: 16px; margin: 16px 0;
  box-shadow: 0 1px 3px #0002; }
section h2 { margin: 0 0 10px; font-size: 1.25em; color: #1f4e79; }
section h3 { margin: 14px 0 6px; font-size: 1.02em; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(300px, 1fr)); gap: 16px; }
figure { margin: 0; } figcaption { font-weight: 600; margin-bottom: 4px; }
svg { width: 100%; height: auto; display: block; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: .88em; }
th { background: #ddebf7; text-align: left; position: sticky; top: 0; }
th, td { padding: 5px 8px; border-bottom: 1px solid #e3e6e9; vertical-align: top; }
td.wide { min-width: 16em; }
td.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.tag { display: inline-block; padding: 0 6px; border-radius: 4px; color: #fff; font-size: .85em; }
.tag.red { background: #c0392b; } .tag.amber { background: #d68910; } .tag.green { background: #1e8449; }
.more, .omitted { color: #666; font-size: .9em; }
footer { color: #666; font-size: .8em; text-align: center; padding: 8px 16px 24px; }
@media (max-width: 600px) { body { font-size: 14px; } main { padding: 8px; }
  section { padding: 10px; } header { padding: 14px; } }
@media print { body { background: #fff; } header { background: #fff; color: #000;
  border-bottom: 2px solid #1f4e79; } section { box-shadow: none; break-inside: avoid-page; }
  .cards .card { box-shadow: none; border: 1px solid #ccc; } th { position: static; } }
";

/// The dashboard's HTML.
pub fn dashboard(pack: &Pack, top: usize) -> String {
    let mut h = String::new();
    header(&mut h, pack);
    cards(&mut h, pack);
    churn_section(&mut h, pack, top);
    loyalty_section(&mut h, pack);
    purchasing_section(&mut h, pack, top);
    closing_sections(&mut h, pack, top);
    h
}

/// The page's head and its header: title, as-of date, what it is compared with, for whom.
fn header(h: &mut String, pack: &Pack) {
    let _ = write!(
        h,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; \
         style-src 'unsafe-inline'; img-src data:\">\
         <title>{} as of {}</title><style>{STYLE}</style></head><body>\n",
        esc(&pack.title),
        pack.as_of
    );
    let mut sub = format!("As of {}", pack.as_of);
    if let Some(p) = pack.previous {
        let _ = write!(sub, ", compared with {p}");
    }
    if let Some(r) = &pack.role {
        let _ = write!(sub, ". Prepared for role {r}");
    }
    let _ = write!(
        h,
        "<header><h1>{}</h1><p>{}</p></header>\n<main>\n",
        esc(&pack.title),
        esc(&sub)
    );
}

/// The headline figures as cards, and the sections left out.
fn cards(h: &mut String, pack: &Pack) {
    h.push_str("<div class=\"cards\">");
    for f in &pack.headline {
        let class = match f.change() {
            None => "flat",
            Some(0.0) => "flat",
            Some(d) if (d > 0.0) == f.higher_is_better => "good",
            Some(_) => "bad",
        };
        let change = f
            .show_change()
            .map(|c| {
                format!(
                    "{c} since {}",
                    pack.previous.map(|p| p.to_string()).unwrap_or_default()
                )
            })
            .unwrap_or_else(|| "no earlier figure".into());
        let _ = write!(
            h,
            "<div class=\"card\"><div class=\"label\">{}</div><div class=\"value\">{}</div>\
             <div class=\"change {class}\">{}</div></div>",
            esc(&f.label),
            esc(&f.show(f.value)),
            esc(&change)
        );
    }
    h.push_str("</div>\n");
    for (section, why) in &pack.omitted {
        let _ = write!(
            h,
            "<p class=\"omitted\">Left out: {}: {}</p>",
            esc(section),
            esc(why)
        );
    }
}

/// Churn warnings: revenue at risk and warned customers by region, and the customers.
fn churn_section(h: &mut String, pack: &Pack, top: usize) {
    let churn = pack.table("churn_warnings");
    let region = pack.table("risk_by_region");
    if churn.is_some() || region.is_some() {
        h.push_str("<section id=\"churn\"><h2>Churn warnings</h2>");
        if let Some(t) = region {
            let (cats, vals) = (texts(t, "region"), numbers(t, "revenue_at_risk"));
            let _ = write!(
                h,
                "<div class=\"charts\"><figure><figcaption>{}</figcaption>{}</figure>",
                esc(&t.title),
                svg::columns(&t.title, &cats, &vals, RED, &|v| group_digits(v))
            );
            let (red, amber) = (numbers(t, "red"), numbers(t, "amber"));
            let warned: Vec<f64> = red.iter().zip(&amber).map(|(r, a)| r + a).collect();
            let _ = write!(
                h,
                "<figure><figcaption>Red and amber customers by region</figcaption>{}</figure></div>",
                svg::hbars(
                    "Red and amber customers by region",
                    &cats,
                    &warned,
                    AMBER,
                    &|v| group_digits(v)
                )
            );
        }
        if let Some(t) = churn {
            let _ = write!(
                h,
                "<h3>Red and amber customers with the most revenue at risk</h3>{}",
                html_table(t, top)
            );
        }
        h.push_str("</section>\n");
    }
}

/// Loyalty: customers per tier and the Pareto curve.
fn loyalty_section(h: &mut String, pack: &Pack) {
    let tiers = pack.table("loyalty_tiers");
    let pareto = pack.table("pareto");
    if tiers.is_some() || pareto.is_some() {
        h.push_str("<section id=\"loyalty\"><h2>Loyalty structure</h2><div class=\"charts\">");
        if let Some(t) = tiers {
            let _ = write!(
                h,
                "<figure><figcaption>Customers per loyalty tier</figcaption>{}</figure>",
                svg::hbars(
                    "Customers per loyalty tier",
                    &texts(t, "tier"),
                    &numbers(t, "customers"),
                    ACCENT,
                    &|v| group_digits(v)
                )
            );
        }
        if let Some(t) = pareto {
            let _ = write!(
                h,
                "<figure><figcaption>{}</figcaption>{}</figure>",
                esc(&t.title),
                svg::share_curve(
                    &t.title,
                    &numbers(t, "top_customers_pct"),
                    &numbers(t, "revenue_share"),
                    ACCENT,
                    "top customers by revenue"
                )
            );
        }
        h.push_str("</div>");
        if let Some(t) = tiers {
            h.push_str(&html_table(t, usize::MAX));
        }
        h.push_str("</section>\n");
    }
}

/// Purchasing power: lifetime values, spend per band, and the top customers.
fn purchasing_section(h: &mut String, pack: &Pack, top: usize) {
    let bands = pack.table("purchasing_power_bands");
    let clv = pack.table("clv_distribution");
    let top_clv = pack.table("top_clv");
    if bands.is_some() || clv.is_some() || top_clv.is_some() {
        h.push_str("<section id=\"purchasing\"><h2>Purchasing power</h2>");
        h.push_str("<div class=\"charts\">");
        if let Some(t) = clv {
            let _ = write!(
                h,
                "<figure><figcaption>{}</figcaption>{}</figure>",
                esc(&t.title),
                svg::columns(
                    &t.title,
                    &texts(t, "clv_range"),
                    &numbers(t, "customers"),
                    ACCENT,
                    &|v| group_digits(v)
                )
            );
        }
        if let Some(t) = bands {
            let caption = "Predicted spend, next 12 months, per purchasing power band";
            let _ = write!(
                h,
                "<figure><figcaption>{caption}</figcaption>{}</figure>",
                svg::hbars(
                    caption,
                    &texts(t, "purchasing_power_band"),
                    &numbers(t, "predicted_spend_12m"),
                    ACCENT,
                    &|v| group_digits(v)
                )
            );
        }
        h.push_str("</div>");
        if let Some(t) = bands {
            let _ = write!(h, "<h3>{}</h3>{}", esc(&t.title), html_table(t, usize::MAX));
        }
        if let Some(t) = top_clv {
            let _ = write!(h, "<h3>{}</h3>{}", esc(&t.title), html_table(t, top));
        }
        h.push_str("</section>\n");
    }
}

/// Knowledge sources, the extract's own queries, the notes, and the page's end.
fn closing_sections(h: &mut String, pack: &Pack, top: usize) {
    if let Some(t) = pack.table("knowledge_sources") {
        let _ = writeln!(
            h,
            "<section id=\"knowledge\"><h2>{}</h2>{}</section>",
            esc(&t.title),
            html_table(t, top)
        );
    }
    for t in &pack.tables {
        if !crate::plan::extracts::PACK_TABLES.contains(&t.name.as_str()) {
            let _ = writeln!(
                h,
                "<section><h2>{}</h2>{}</section>",
                esc(&t.title),
                html_table(t, 200)
            );
        }
    }
    if let Some(t) = pack.table("notes") {
        let _ = writeln!(
            h,
            "<section id=\"notes\"><h2>{}</h2>{}</section>",
            esc(&t.title),
            html_table(t, usize::MAX)
        );
    }
    let _ = writeln!(
        h,
        "</main><footer>Made by kbcrm {} from the warehouse's table versions listed in the \
         notes. The workbook holds every row.</footer></body></html>",
        env!("CARGO_PKG_VERSION")
    );
}

fn texts(t: &PackTable, col: &str) -> Vec<String> {
    t.col(col)
        .map(|i| {
            t.cells(i)
                .into_iter()
                .map(|c| match c {
                    Cell::Text(s) => s,
                    Cell::Number(n) => format!("{n}"),
                    Cell::Date(d) => d.to_string(),
                    Cell::Null => "unknown".into(),
                })
                .collect()
        })
        .unwrap_or_default()
}

fn numbers(t: &PackTable, col: &str) -> Vec<f64> {
    t.col(col)
        .map(|i| {
            t.cells(i)
                .into_iter()
                .map(|c| match c {
                    Cell::Number(n) => n,
                    _ => 0.0,
                })
                .collect()
        })
        .unwrap_or_default()
}

fn show(cell: &Cell, kind: ColumnKind) -> (String, bool) {
    match cell {
        Cell::Null => (String::new(), false),
        Cell::Text(s) => (esc(s), false),
        Cell::Date(d) => (d.to_string(), true),
        Cell::Number(v) => (
            match kind {
                ColumnKind::Integer | ColumnKind::Money => group_digits(*v),
                ColumnKind::Share => format!("{:.1}%", v * 100.0),
                _ => format!("{v:.2}"),
            },
            true,
        ),
    }
}

/// A table of at most `limit` rows, with a line saying how many more the workbook holds.
fn html_table(t: &PackTable, limit: usize) -> String {
    let schema = t.batch.schema();
    let mut h = String::from("<div class=\"scroll\"><table><thead><tr>");
    for f in schema.fields() {
        let _ = write!(h, "<th>{}</th>", esc(&f.name().replace('_', " ")));
    }
    h.push_str("</tr></thead><tbody>");
    let cols: Vec<(Vec<Cell>, ColumnKind, bool, bool)> = (0..schema.fields().len())
        .map(|i| {
            let cells = t.cells(i);
            // Long text (the reasons) keeps a readable width; the table scrolls instead.
            let wide = cells
                .iter()
                .any(|c| matches!(c, Cell::Text(s) if s.chars().count() > 40));
            (
                cells,
                t.kind(i),
                schema.field(i).name() == "warning_level",
                wide,
            )
        })
        .collect();
    let shown = t.rows().min(limit);
    for r in 0..shown {
        h.push_str("<tr>");
        for (cells, kind, level, wide) in &cols {
            let (text, numeric) = show(&cells[r], *kind);
            if *level && !text.is_empty() {
                let _ = write!(h, "<td><span class=\"tag {text}\">{text}</span></td>");
            } else if *wide {
                let _ = write!(h, "<td class=\"wide\">{text}</td>");
            } else if numeric {
                let _ = write!(h, "<td class=\"n\">{text}</td>");
            } else {
                let _ = write!(h, "<td>{text}</td>");
            }
        }
        h.push_str("</tr>");
    }
    h.push_str("</tbody></table></div>");
    if t.rows() > shown {
        let _ = write!(
            h,
            "<p class=\"more\">{} more rows in the workbook and the table files.</p>",
            group_digits((t.rows() - shown) as f64)
        );
    }
    if t.rows() == 0 {
        h.push_str("<p class=\"more\">No rows.</p>");
    }
    h
}
