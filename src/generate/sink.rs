//! Output files of the generator: CSV and NDJSON writers that count rows and plant malformed
//! rows, recording each one (file, line, kind) for the ground truth.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};

/// Share of rows planted as malformed in transactional files.
pub const MALFORMED_RATE: f64 = 0.001;

/// Where each kind of damage goes in a row.
#[derive(Debug, Clone, Copy, Default)]
pub struct Damage {
    /// Index of a required id field (emptied).
    pub id: Option<usize>,
    /// Index of a numeric field (garbled).
    pub number: Option<usize>,
    /// Index of a date or timestamp field (impossible date).
    pub date: Option<usize>,
    /// Whether rows may be planted as malformed at all.
    pub enabled: bool,
}

/// A malformed row planted in a file.
#[derive(Debug, Clone)]
pub struct Malformed {
    /// File path relative to the output folder.
    pub file: String,
    /// 1-based line.
    pub line: u64,
    /// What was done to it.
    pub kind: &'static str,
}

/// Rows written to one file.
#[derive(Debug, Clone)]
pub struct FileCount {
    /// File path relative to the output folder.
    pub file: String,
    /// Data rows (header excluded), malformed included.
    pub rows: u64,
    /// Malformed rows.
    pub malformed: u64,
}

/// A CSV or NDJSON output file.
pub struct Sink {
    rel: String,
    out: BufWriter<File>,
    path: PathBuf,
    json: bool,
    columns: Vec<&'static str>,
    damage: Damage,
    line: u64,
    rows: u64,
    buf: String,
    /// Planted malformed rows.
    pub malformed: Vec<Malformed>,
}

impl Sink {
    /// Create `root/rel` with a CSV header (or none for NDJSON, `json = true`).
    pub fn create(
        root: &Path,
        rel: &str,
        columns: &[&'static str],
        json: bool,
        damage: Damage,
    ) -> Result<Self> {
        let path = root.join(rel);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut sink = Sink {
            rel: rel.to_string(),
            out: BufWriter::with_capacity(1 << 20, file),
            path,
            json,
            columns: columns.to_vec(),
            damage,
            line: 0,
            rows: 0,
            buf: String::with_capacity(512),
            malformed: Vec::new(),
        };
        if !json {
            let header = columns.join(",");
            sink.write_line(&header)?;
        }
        Ok(sink)
    }

    fn write_line(&mut self, s: &str) -> Result<()> {
        self.line += 1;
        self.out
            .write_all(s.as_bytes())
            .and_then(|()| self.out.write_all(b"\n"))
            .map_err(|e| Error::io(&self.path, e))
    }

    /// Write one row; `fields` are the values in column order (`None` = empty / null).
    pub fn row(&mut self, rng: &mut ChaCha8Rng, fields: &mut [Option<String>]) -> Result<()> {
        self.rows += 1;
        let mut kind = None;
        if self.damage.enabled && rng.random_bool(MALFORMED_RATE) {
            kind = Some(self.plant(rng, fields));
        }
        self.buf.clear();
        if self.json {
            if kind == Some("truncated_json") {
                render_json(&mut self.buf, &self.columns, fields);
                let cut = self.buf.len() / 2;
                let cut = (0..=cut)
                    .rev()
                    .find(|i| self.buf.is_char_boundary(*i))
                    .unwrap_or(0);
                self.buf.truncate(cut);
            } else {
                render_json(&mut self.buf, &self.columns, fields);
            }
        } else {
            let n = if kind == Some("wrong_field_count") {
                fields.len() - 1
            } else {
                fields.len()
            };
            render_csv(&mut self.buf, &fields[..n]);
        }
        let line = std::mem::take(&mut self.buf);
        let result = self.write_line(&line);
        self.buf = line;
        if let Some(kind) = kind {
            self.malformed.push(Malformed {
                file: self.rel.clone(),
                line: self.line,
                kind,
            });
        }
        result
    }

    fn plant(&self, rng: &mut ChaCha8Rng, fields: &mut [Option<String>]) -> &'static str {
        let d = self.damage;
        let mut options: Vec<&'static str> = Vec::with_capacity(4);
        if d.id.is_some() {
            options.push("missing_id");
        }
        if d.number.is_some() {
            options.push("bad_number");
        }
        if d.date.is_some() {
            options.push("bad_date");
        }
        options.push(if self.json {
            "truncated_json"
        } else {
            "wrong_field_count"
        });
        let kind = options[rng.random_range(0..options.len())];
        match kind {
            "missing_id" => fields[d.id.unwrap_or(0)] = None,
            "bad_number" => fields[d.number.unwrap_or(0)] = Some("12,5x".to_string()),
            "bad_date" => fields[d.date.unwrap_or(0)] = Some("2024-13-45".to_string()),
            _ => {}
        }
        kind
    }

    /// Flush and return the counts.
    pub fn finish(mut self) -> Result<(FileCount, Vec<Malformed>)> {
        self.out.flush().map_err(|e| Error::io(&self.path, e))?;
        let count = FileCount {
            file: self.rel.clone(),
            rows: self.rows,
            malformed: self.malformed.len() as u64,
        };
        Ok((count, self.malformed))
    }
}

fn render_csv(buf: &mut String, fields: &[Option<String>]) {
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            buf.push(',');
        }
        if let Some(v) = f {
            if v.contains([',', '"', '\n', '\r']) || v.starts_with(' ') || v.ends_with(' ') {
                buf.push('"');
                buf.push_str(&v.replace('"', "\"\""));
                buf.push('"');
            } else {
                buf.push_str(v);
            }
        }
    }
}

/// NDJSON: values that look like numbers or booleans are written bare, the rest as strings.
fn render_json(buf: &mut String, columns: &[&str], fields: &[Option<String>]) {
    buf.push('{');
    let mut first = true;
    for (c, f) in columns.iter().zip(fields) {
        let Some(v) = f else { continue };
        if !first {
            buf.push(',');
        }
        first = false;
        let _ = write!(buf, "{}:", serde_json::Value::from(*c));
        let bare = v == "true" || v == "false" || is_plain_number(v);
        if bare {
            buf.push_str(v);
        } else {
            let _ = write!(buf, "{}", serde_json::Value::from(v.as_str()));
        }
    }
    buf.push('}');
}

/// `-?[1-9][0-9]*(\.[0-9]+)?` or `0`: written as a JSON number.
fn is_plain_number(v: &str) -> bool {
    let digits = v.strip_prefix('-').unwrap_or(v);
    let (int, frac) = digits.split_once('.').unwrap_or((digits, "0"));
    let int_ok = int == "0"
        || (int.starts_with(|c: char| ('1'..='9').contains(&c))
            && int.bytes().all(|b| b.is_ascii_digit()));
    int_ok
        && !frac.is_empty()
        && frac.bytes().all(|b| b.is_ascii_digit())
        && (int != "0" || !v.starts_with('-') || frac != "0")
}
