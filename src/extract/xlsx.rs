//! The executive workbook: a summary sheet, one sheet per section, native Excel charts over the
//! sheets' own cells, frozen headers, number formats, autofilters and fitted columns.

use rust_xlsxwriter::{
    Chart, ChartFormat, ChartSolidFill, ChartType, Color, DocProperties, ExcelDateTime, Format,
    FormatAlign, FormatBorder, Workbook, Worksheet, XlsxError,
};

use super::pack::{Cell, ColumnKind, FigureKind, Pack, PackTable};
use crate::error::{Error, Result};

const ACCENT: u32 = 0x1F4E79;
const RED: u32 = 0xC0392B;
const HEADER_FILL: u32 = 0xDDEBF7;

/// The workbook's bytes.
pub fn workbook(pack: &Pack) -> Result<Vec<u8>> {
    build(pack).map_err(Error::Workbook)
}

/// Where a table landed on a sheet: header row, first column, last data row, last column.
#[derive(Clone, Copy)]
struct Placed {
    header: u32,
    col: u16,
    last_row: u32,
    last_col: u16,
}

fn build(pack: &Pack) -> std::result::Result<Vec<u8>, XlsxError> {
    let mut wb = Workbook::new();
    let day = |d: chrono::NaiveDate| {
        use chrono::Datelike;
        ExcelDateTime::from_ymd(d.year() as u16, d.month() as u8, d.day() as u8)
    };
    // The as-of date as the creation date: the same versions give the same bytes.
    let props = DocProperties::new()
        .set_title(&pack.title)
        .set_author("kbcrm")
        .set_comment(format!("Figures as of {}", pack.as_of))
        .set_creation_datetime(&day(pack.as_of)?);
    wb.set_properties(&props);

    summary_sheet(wb.add_worksheet(), pack)?;
    if let Some(t) = pack.table("churn_warnings") {
        let ws = wb.add_worksheet();
        ws.set_name("Churn warnings")?;
        list_sheet(ws, t, pack)?;
    }
    let tiers = pack.table("loyalty_tiers");
    let pareto = pack.table("pareto");
    if tiers.is_some() || pareto.is_some() {
        loyalty_sheet(wb.add_worksheet(), pack, tiers, pareto)?;
    }
    let bands = pack.table("purchasing_power_bands");
    let clv = pack.table("clv_distribution");
    let top = pack.table("top_clv");
    if bands.is_some() || clv.is_some() || top.is_some() {
        purchasing_sheet(wb.add_worksheet(), pack, bands, clv, top)?;
    }
    if let Some(t) = pack.table("knowledge_sources") {
        let ws = wb.add_worksheet();
        ws.set_name("Knowledge sources")?;
        list_sheet(ws, t, pack)?;
    }
    for t in &pack.tables {
        let built_in = crate::plan::extracts::PACK_TABLES.contains(&t.name.as_str());
        if !built_in {
            let ws = wb.add_worksheet();
            ws.set_name(sheet_name(&t.name))?;
            list_sheet(ws, t, pack)?;
        }
    }
    if let Some(t) = pack.table("notes") {
        let ws = wb.add_worksheet();
        ws.set_name("Notes")?;
        list_sheet(ws, t, pack)?;
    }
    wb.save_to_buffer()
}

/// The loyalty sheet: the tiers with a bar chart, and the Pareto curve beside them.
fn loyalty_sheet(
    ws: &mut Worksheet,
    pack: &Pack,
    tiers: Option<&PackTable>,
    pareto: Option<&PackTable>,
) -> std::result::Result<(), XlsxError> {
    ws.set_name("Loyalty")?;
    title(ws, 0, "Loyalty structure", pack)?;
    let mut col = 0;
    if let Some(t) = tiers {
        let p = table(ws, 3, 0, t)?;
        ws.set_freeze_panes(4, 0)?;
        let mut c = Chart::new(ChartType::Bar);
        c.add_series()
            .set_name("Customers")
            .set_categories(("Loyalty", p.header + 1, p.col, p.last_row, p.col))
            .set_values(("Loyalty", p.header + 1, p.col + 1, p.last_row, p.col + 1))
            .set_format(&mut fill(ACCENT));
        c.title().set_name("Loyalty tiers (customers)");
        c.x_axis().set_num_format("#,##0");
        c.y_axis().set_reverse();
        c.legend().set_hidden();
        ws.insert_chart(p.last_row + 3, 0, &c)?;
        col = p.last_col + 2;
    }
    if let Some(t) = pareto {
        let p = table(ws, 3, col, t)?;
        let mut c = Chart::new(ChartType::ScatterStraight);
        c.add_series()
            .set_name("Share of revenue")
            .set_categories(("Loyalty", p.header + 1, p.col, p.last_row, p.col))
            .set_values(("Loyalty", p.header + 1, p.col + 1, p.last_row, p.col + 1))
            .set_format(
                ChartFormat::new().set_line(
                    rust_xlsxwriter::ChartLine::new()
                        .set_color(Color::RGB(ACCENT))
                        .set_width(2.25),
                ),
            );
        c.title()
            .set_name("Pareto curve: revenue share of the top customers");
        c.x_axis()
            .set_name("Top customers (%)")
            .set_min(0)
            .set_max(100);
        c.y_axis().set_num_format("0%").set_min(0).set_max(1);
        c.legend().set_hidden();
        ws.insert_chart(
            tiers.map(|t| t.rows() as u32 + 22).unwrap_or(3) + 3,
            col.min(2),
            &c,
        )?;
    }
    Ok(())
}

/// The purchasing power sheet: the bands, the lifetime value ranges with a column chart, and
/// the top customers.
fn purchasing_sheet(
    ws: &mut Worksheet,
    pack: &Pack,
    bands: Option<&PackTable>,
    clv: Option<&PackTable>,
    top: Option<&PackTable>,
) -> std::result::Result<(), XlsxError> {
    ws.set_name("Purchasing power")?;
    title(ws, 0, "Purchasing power and predicted lifetime value", pack)?;
    let mut row = 3;
    if let Some(t) = bands {
        let p = table(ws, row, 0, t)?;
        row = p.last_row + 3;
    }
    if let Some(t) = clv {
        let p = table(ws, row, 0, t)?;
        let mut c = Chart::new(ChartType::Column);
        c.add_series()
            .set_name("Customers")
            .set_categories(("Purchasing power", p.header + 1, 0, p.last_row, 0))
            .set_values(("Purchasing power", p.header + 1, 1, p.last_row, 1))
            .set_format(&mut fill(ACCENT));
        c.title()
            .set_name("Predicted 12-month CLV: customers per range");
        c.y_axis().set_num_format("#,##0");
        c.legend().set_hidden();
        ws.insert_chart(p.header, p.last_col + 2, &c)?;
        row = p.last_row + 12;
    }
    if let Some(t) = top {
        sub_title(ws, row, &t.title)?;
        table(ws, row + 1, 0, t)?;
    }
    Ok(())
}

fn fill(color: u32) -> ChartFormat {
    let mut f = ChartFormat::new();
    f.set_solid_fill(ChartSolidFill::new().set_color(Color::RGB(color)));
    f
}

/// Excel's sheet names: at most 31 characters, no []:*?/\.
fn sheet_name(name: &str) -> String {
    let mut s: String = name
        .replace('_', " ")
        .chars()
        .filter(|c| !"[]:*?/\\".contains(*c))
        .take(31)
        .collect();
    if let Some(first) = s.get(0..1) {
        s = first.to_uppercase() + &s[1..];
    }
    s
}

fn title(
    ws: &mut Worksheet,
    row: u32,
    text: &str,
    pack: &Pack,
) -> std::result::Result<(), XlsxError> {
    let big = Format::new()
        .set_bold()
        .set_font_size(16)
        .set_font_color(Color::RGB(ACCENT));
    ws.write_string_with_format(row, 0, text, &big)?;
    let mut sub = format!("As of {}", pack.as_of);
    if let Some(p) = pack.previous {
        sub.push_str(&format!(", compared with {p}"));
    }
    if let Some(r) = &pack.role {
        sub.push_str(&format!(". Prepared for role {r}"));
    }
    ws.write_string_with_format(row + 1, 0, &sub, &Format::new().set_italic())?;
    // Printed (or saved as PDF): landscape, one page wide.
    ws.set_landscape();
    ws.set_print_fit_to_pages(1, 0);
    Ok(())
}

fn sub_title(ws: &mut Worksheet, row: u32, text: &str) -> std::result::Result<(), XlsxError> {
    let f = Format::new()
        .set_bold()
        .set_font_size(12)
        .set_font_color(Color::RGB(ACCENT));
    ws.write_string_with_format(row, 0, text, &f)?;
    Ok(())
}

/// A sheet holding one table: title, frozen header, autofilter.
fn list_sheet(
    ws: &mut Worksheet,
    t: &PackTable,
    pack: &Pack,
) -> std::result::Result<(), XlsxError> {
    title(ws, 0, &t.title, pack)?;
    let p = table(ws, 3, 0, t)?;
    ws.set_freeze_panes(4, 0)?;
    if t.rows() > 0 {
        ws.autofilter(p.header, p.col, p.last_row, p.last_col)?;
    }
    Ok(())
}

fn header_format() -> Format {
    Format::new()
        .set_bold()
        .set_background_color(Color::RGB(HEADER_FILL))
        .set_border_bottom(FormatBorder::Thin)
        .set_align(FormatAlign::Center)
        .set_text_wrap()
}

fn number_format(kind: ColumnKind) -> Format {
    match kind {
        ColumnKind::Integer | ColumnKind::Money => Format::new().set_num_format("#,##0"),
        ColumnKind::Share => Format::new().set_num_format("0.0%"),
        ColumnKind::Decimal => Format::new().set_num_format("#,##0.00"),
        ColumnKind::Date => Format::new().set_num_format("yyyy-mm-dd"),
        ColumnKind::Text => Format::new(),
    }
}

/// Write a table with its header at (`row`, `col`); columns sized to their content.
fn table(
    ws: &mut Worksheet,
    row: u32,
    col: u16,
    t: &PackTable,
) -> std::result::Result<Placed, XlsxError> {
    let schema = t.batch.schema();
    let header = header_format();
    let n = schema.fields().len() as u16;
    for (i, f) in schema.fields().iter().enumerate() {
        let c = col + i as u16;
        ws.write_string_with_format(row, c, f.name().replace('_', " "), &header)?;
        let kind = t.kind(i);
        let format = number_format(kind);
        let cells = t.cells(i);
        let mut width = f.name().len().clamp(8, 22);
        for (r, cell) in cells.iter().enumerate() {
            let r = row + 1 + r as u32;
            match cell {
                Cell::Null => {}
                Cell::Text(s) => {
                    width = width.max(s.chars().count().min(70));
                    ws.write_string(r, c, s)?;
                }
                Cell::Number(v) => {
                    width = width.max(12);
                    ws.write_number_with_format(r, c, *v, &format)?;
                }
                Cell::Date(d) => {
                    use chrono::Datelike;
                    let x =
                        ExcelDateTime::from_ymd(d.year() as u16, d.month() as u8, d.day() as u8)?;
                    ws.write_date_with_format(r, c, &x, &format)?;
                }
            }
        }
        ws.set_column_width(c, (width + 2) as f64)?;
    }
    let rows = t.rows() as u32;
    Ok(Placed {
        header: row,
        col,
        last_row: row + rows.max(1),
        last_col: col + n.saturating_sub(1),
    })
}

fn summary_sheet(ws: &mut Worksheet, pack: &Pack) -> std::result::Result<(), XlsxError> {
    ws.set_name("Summary")?;
    title(ws, 0, &pack.title, pack)?;
    let header = header_format();
    let prev = pack
        .previous
        .map(|p| format!("As of {p}"))
        .unwrap_or_else(|| "Previous".into());
    let heads = [
        "Figure".to_string(),
        format!("As of {}", pack.as_of),
        prev,
        "Change".into(),
        "Change %".into(),
    ];
    for (i, h) in heads.iter().enumerate() {
        ws.write_string_with_format(3, i as u16, h, &header)?;
    }
    let bad = Format::new().set_font_color(Color::RGB(RED));
    for (i, f) in pack.headline.iter().enumerate() {
        let r = 4 + i as u32;
        ws.write_string(r, 0, &f.label)?;
        let kind = match f.kind {
            FigureKind::Count => ColumnKind::Integer,
            FigureKind::Money => ColumnKind::Money,
            FigureKind::Share => ColumnKind::Share,
        };
        let format = number_format(kind);
        for (c, v) in [(1, f.value), (2, f.previous), (3, f.change())] {
            match v {
                Some(v) => {
                    let worse = c == 3 && ((v > 0.0) != f.higher_is_better) && v != 0.0;
                    let fmt = if worse {
                        format.clone().set_font_color(Color::RGB(RED))
                    } else {
                        format.clone()
                    };
                    ws.write_number_with_format(r, c, v, &fmt)?;
                }
                None => {
                    ws.write_string_with_format(r, c, "n/a", &bad)?;
                }
            }
        }
        if let Some(ratio) = f.change_ratio() {
            ws.write_number_with_format(r, 4, ratio, &number_format(ColumnKind::Share))?;
        }
    }
    ws.set_column_width(0, 34)?;
    for c in 1..=4 {
        ws.set_column_width(c, 18)?;
    }
    ws.set_freeze_panes(4, 0)?;
    let mut row = 5 + pack.headline.len() as u32;
    for (section, why) in &pack.omitted {
        ws.write_string_with_format(row, 0, format!("Left out: {section}: {why}"), &bad)?;
        row += 1;
    }
    if let Some(t) = pack.table("risk_by_region") {
        row += 1;
        sub_title(ws, row, &t.title)?;
        let p = table(ws, row + 1, 0, t)?;
        ws.set_column_width(0, 34)?;
        for c in 1..=4 {
            ws.set_column_width(c, 18)?;
        }
        let mut c = Chart::new(ChartType::Column);
        c.add_series()
            .set_name("Revenue at risk")
            .set_categories(("Summary", p.header + 1, 0, p.last_row, 0))
            .set_values(("Summary", p.header + 1, 4, p.last_row, 4))
            .set_format(&mut fill(RED));
        c.title().set_name("Revenue at risk by region");
        c.y_axis().set_num_format("#,##0");
        c.legend().set_hidden();
        ws.insert_chart(3, 6, &c)?;
    }
    Ok(())
}
