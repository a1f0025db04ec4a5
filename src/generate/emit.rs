//! Writing the simulated world as each source system would export it.

mod part;
pub use part::part;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, Date32Array, Decimal128Array, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use chrono::{NaiveDate, NaiveDateTime};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::names::CATEGORIES;
use super::sink::{Damage, FileCount, Malformed, Sink};
use super::world::{self, CHANNELS, Catalog, Customer, Details, batch_day, end, mix};
use crate::error::{Error, Result};

/// What one part of the customers produced.
pub struct PartOutput {
    pub files: Vec<FileCount>,
    pub malformed: Vec<Malformed>,
    /// (system, source id, true id)
    pub identity: Vec<(&'static str, String, String)>,
    /// One line of truth/customers.csv per customer.
    pub truth: Vec<String>,
    /// Customers whose details change in this batch: (true id, what changed).
    pub changes: Vec<(String, &'static str)>,
}

fn file_rng(seed: u64, name: &str) -> ChaCha8Rng {
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    ChaCha8Rng::seed_from_u64(mix(seed, h))
}

fn money(cents: i64) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    format!("{sign}{}.{:02}", cents.abs() / 100, cents.abs() % 100)
}

fn ymd(d: NaiveDate) -> String {
    d.format("%Y-%m-%d").to_string()
}

fn de_date(d: NaiveDate) -> String {
    d.format("%d.%m.%Y").to_string()
}

fn ts(t: NaiveDateTime) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

fn iso(t: NaiveDateTime) -> String {
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// Whether something that happens (arrives) on `day` belongs in batch `b`.
fn in_batch(day: NaiveDate, b: u32) -> bool {
    if b == 1 {
        day <= end()
    } else {
        day == batch_day(b)
    }
}

fn email_variant(rng: &mut ChaCha8Rng, email: &str) -> String {
    match rng.random_range(0..100) {
        0..=69 => email.to_string(),
        70..=84 => {
            let (local, domain) = email.split_once('@').unwrap_or((email, ""));
            let cap = |s: &str| {
                s.split('.')
                    .map(|p| {
                        let mut c = p.chars();
                        c.next()
                            .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
                            .unwrap_or_default()
                    })
                    .collect::<Vec<_>>()
                    .join(".")
            };
            format!("{}@{}", cap(local), cap(domain))
        }
        85..=94 => email.to_uppercase(),
        _ => format!("  {email} "),
    }
}

fn phone_variant(rng: &mut ChaCha8Rng, e164: &str) -> String {
    // e164 = +4915XXXXXXXX
    let national = &e164[3..]; // 15XXXXXXXX
    let (a, b) = national.split_at(3);
    match rng.random_range(0..6) {
        0 => e164.to_string(),
        1 => format!("+49 {a} {b}"),
        2 => format!("0{a} {b}"),
        3 => format!("0049 {a}-{b}"),
        4 => format!("(0{a}) {} {}", &b[..3], &b[3..]),
        _ => format!("0{national}"),
    }
}

fn tax_variant(rng: &mut ChaCha8Rng, tax: &str) -> String {
    let digits = &tax[2..];
    match rng.random_range(0..20) {
        0..=13 => tax.to_string(),
        14..=16 => format!("DE {} {} {}", &digits[..3], &digits[3..6], &digits[6..]),
        17..=18 => tax.to_lowercase(),
        _ => format!("DE-{}.{}.{}", &digits[..3], &digits[3..6], &digits[6..]),
    }
}

struct Files {
    root: std::path::PathBuf,
    seed: u64,
    batch: u32,
    counts: Vec<FileCount>,
    malformed: Vec<Malformed>,
}

impl Files {
    fn open(
        &self,
        rel: &str,
        cols: &[&'static str],
        json: bool,
        damage: Damage,
    ) -> Result<(Sink, ChaCha8Rng)> {
        Ok((
            Sink::create(&self.root, rel, cols, json, damage)?,
            file_rng(self.seed ^ u64::from(self.batch), rel),
        ))
    }

    fn close(&mut self, sink: Sink) -> Result<()> {
        let (count, malformed) = sink.finish()?;
        self.counts.push(count);
        self.malformed.extend(malformed);
        Ok(())
    }
}

fn o<T: ToString>(v: T) -> Option<String> {
    Some(v.to_string())
}

/// Products, channels, employees, campaigns.
pub fn catalog_files(
    root: &Path,
    catalog: &Catalog,
    seed: u64,
    batch: u32,
) -> Result<Vec<FileCount>> {
    let mut f = Files {
        root: root.to_path_buf(),
        seed,
        batch,
        counts: Vec::new(),
        malformed: Vec::new(),
    };
    let b = format!("{batch:04}");
    if batch == 1 {
        let (mut s, mut rng) = f.open(
            "sales/channels/channels.csv",
            &["channel_id", "name", "channel_type"],
            false,
            Damage::default(),
        )?;
        for (id, name, ty) in CHANNELS {
            s.row(&mut rng, &mut [o(id), o(name), o(ty)])?;
        }
        f.close(s)?;
        let (mut s, mut rng) = f.open(
            "erp/employees/employees.csv",
            &[
                "employee_id",
                "full_name",
                "role",
                "region",
                "email",
                "hire_date",
            ],
            false,
            Damage::default(),
        )?;
        for e in &catalog.employees {
            s.row(
                &mut rng,
                &mut [
                    o(&e.id),
                    o(&e.name),
                    o(e.role),
                    o(e.region),
                    o(&e.email),
                    o(ymd(e.hired)),
                ],
            )?;
        }
        f.close(s)?;
        f.counts.push(products_parquet(root, catalog)?);
    }
    let (mut s, mut rng) = f.open(
        &format!("sales/campaigns/campaigns_{b}.csv"),
        &["campaign_id", "name", "channel", "sent_on"],
        false,
        Damage::default(),
    )?;
    for c in &catalog.campaigns {
        if in_batch(c.sent, batch) {
            s.row(
                &mut rng,
                &mut [o(&c.id), o(&c.name), o(c.channel), o(ymd(c.sent))],
            )?;
        }
    }
    f.close(s)?;
    Ok(f.counts)
}

fn products_parquet(root: &Path, catalog: &Catalog) -> Result<FileCount> {
    let rel = "sales/products/products.parquet";
    let path = root.join(rel);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let p = &catalog.products;
    let dec = |v: Vec<i64>| -> Result<ArrayRef> {
        Ok(Arc::new(
            Decimal128Array::from(v.into_iter().map(i128::from).collect::<Vec<_>>())
                .with_precision_and_scale(10, 2)?,
        ))
    };
    let schema = Arc::new(Schema::new(vec![
        Field::new("product_id", DataType::Utf8, false),
        Field::new("sku", DataType::Utf8, false),
        Field::new("name", DataType::Utf8, false),
        Field::new("category", DataType::Utf8, false),
        Field::new("subcategory", DataType::Utf8, false),
        Field::new("brand", DataType::Utf8, false),
        Field::new("list_price", DataType::Decimal128(10, 2), false),
        Field::new("unit_cost", DataType::Decimal128(10, 2), false),
        Field::new("launched_on", DataType::Date32, false),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            p.iter().map(|x| x.id.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(
            p.iter().map(|x| x.sku.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(
            p.iter().map(|x| x.name.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(
            p.iter().map(|x| CATEGORIES[x.category].0),
        )),
        Arc::new(StringArray::from_iter_values(
            p.iter().map(|x| x.subcategory),
        )),
        Arc::new(StringArray::from_iter_values(
            p.iter().map(|x| x.brand.as_str()),
        )),
        dec(p.iter().map(|x| x.price_cents).collect())?,
        dec(p.iter().map(|x| x.cost_cents).collect())?,
        Arc::new(Date32Array::from_iter_values(
            p.iter().map(|x| crate::engine::epoch_days(x.launched)),
        )),
    ];
    let batch = RecordBatch::try_new(schema.clone(), columns)?;
    let file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, schema, None)?;
    writer.write(&batch)?;
    writer.close()?;
    Ok(FileCount {
        file: rel.to_string(),
        rows: p.len() as u64,
        malformed: 0,
    })
}

/// What changes, visibly in some system, for an existing customer on the day of batch `b`.
fn visible_change(c: &Customer, b: u32) -> Option<&'static str> {
    let (day, new) = c.change.as_ref()?;
    if b == 1 || *day != batch_day(b) || c.acquired >= *day {
        return None;
    }
    let old = &c.details;
    if new.postcode != old.postcode || new.city != old.city || new.street != old.street {
        Some("address")
    } else if new.email != old.email {
        Some("email")
    } else if new.credit_limit != old.credit_limit && c.erp_id.is_some() {
        Some("credit_limit")
    } else {
        None
    }
}

/// Whether the customer's master records go into batch `b`, and with which details.
fn master_state(c: &Customer, b: u32) -> (bool, Details) {
    if b == 1 {
        return (c.acquired <= end(), c.details.clone());
    }
    let day = batch_day(b);
    match &c.change {
        Some((d, changed)) if *d == day => (c.acquired <= day, changed.clone()),
        Some((d, changed)) if *d < day => (c.acquired == day, changed.clone()),
        _ => (c.acquired == day, c.details.clone()),
    }
}

fn identity_rows(c: &Customer, out: &mut Vec<(&'static str, String, String)>) {
    if let Some(e) = &c.erp_id {
        out.push(("erp", e.clone(), c.true_id.clone()));
    }
    for id in &c.crm_ids {
        out.push(("crm", id.clone(), c.true_id.clone()));
    }
    if let Some(s) = &c.service_id {
        out.push(("service", s.clone(), c.true_id.clone()));
    }
}

fn truth_row(c: &Customer) -> String {
    let orders = c.orders.iter().filter(|o| o.ts.date() <= end()).count();
    let churned = c.churn_date.is_some_and(|d| d <= end());
    format!(
        "{},{},{},{},{},{},{},{}",
        c.true_id,
        c.cohort.as_str(),
        c.b2b,
        ymd(c.acquired),
        churned,
        c.churn_date.map(ymd).unwrap_or_default(),
        c.churn_kind.unwrap_or_default(),
        orders
    )
}

/// Ground-truth files.
pub fn truth_files(
    truth: &Path,
    batch: u32,
    files: &[FileCount],
    malformed: &[Malformed],
    identity: &[(&'static str, String, String)],
    customers: &[String],
    changes: &[(String, &'static str)],
) -> Result<()> {
    let write = |name: &str, body: String| -> Result<()> {
        let p = truth.join(name);
        std::fs::write(&p, body).map_err(|e| Error::io(&p, e))
    };
    let b = format!("{batch:04}");
    let mut s = String::from("file,rows,malformed\n");
    for f in files {
        s.push_str(&format!("{},{},{}\n", f.file, f.rows, f.malformed));
    }
    write(&format!("files_{b}.csv"), s)?;
    let mut s = String::from("file,line,kind\n");
    for m in malformed {
        s.push_str(&format!("{},{},{}\n", m.file, m.line, m.kind));
    }
    write(&format!("malformed_{b}.csv"), s)?;
    let mut s = String::from("true_customer_id,change\n");
    for (id, kind) in changes {
        s.push_str(&format!("{id},{kind}\n"));
    }
    write(&format!("changes_{b}.csv"), s)?;
    let mut s = String::from("system,source_id,true_customer_id\n");
    for (sys, id, t) in identity {
        s.push_str(&format!("{sys},{id},{t}\n"));
    }
    write("identity.csv", s)?;
    let mut s = String::from(
        "true_customer_id,cohort,b2b,acquired_on,churned,churn_date,churn_kind,orders_in_history\n",
    );
    for line in customers {
        s.push_str(line);
        s.push('\n');
    }
    write("customers.csv", s)
}
