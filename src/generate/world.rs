//! The simulated company: customers and everything they do, decided by seeded random draws.
//!
//! Each customer draws from its own random stream (seeded by the seed and its index), so the
//! world is the same whatever the scale of parallelism or the batch being written.

mod simulate;
use chrono::{Duration, NaiveDate, NaiveDateTime, NaiveTime};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Beta, Distribution, Gamma, LogNormal, Normal};

use super::names::*;
use simulate::*;

/// First day of simulated history.
pub fn start() -> NaiveDate {
    NaiveDate::from_ymd_opt(2023, 1, 1).expect("valid date")
}

/// Last day of the first batch (the "history").
pub fn end() -> NaiveDate {
    NaiveDate::from_ymd_opt(2025, 12, 31).expect("valid date")
}

/// Days after [`end`] that later batches can cover.
pub const HORIZON_DAYS: i64 = 30;

/// The day batch `b` (1-based) covers: `end()` for batch 1, one day more for each later batch.
pub fn batch_day(b: u32) -> NaiveDate {
    end() + Duration::days(i64::from(b.max(1)) - 1)
}

/// A mixing function for seeds.
pub fn mix(seed: u64, salt: u64) -> u64 {
    let mut z = seed ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A bijection on 0..10^7 to make source ids that do not reveal the customer index.
pub fn permute(i: u64, salt: u64) -> u64 {
    const M: u64 = 10_000_000;
    (i.wrapping_mul(7_368_787) + salt * 104_729) % M
}

/// Products, channels, employees, campaigns.
pub struct Catalog {
    /// Products.
    pub products: Vec<Product>,
    /// Employees.
    pub employees: Vec<Employee>,
    /// Campaigns.
    pub campaigns: Vec<Campaign>,
    /// Product indices per category.
    by_category: Vec<Vec<usize>>,
    /// Employee indices per (role, region), and per role.
    by_role_region: std::collections::HashMap<(&'static str, &'static str), Vec<usize>>,
    by_role: std::collections::HashMap<&'static str, Vec<usize>>,
}

/// A product.
pub struct Product {
    pub id: String,
    pub sku: String,
    pub name: String,
    pub category: usize,
    pub subcategory: &'static str,
    pub brand: String,
    pub price_cents: i64,
    pub cost_cents: i64,
    pub launched: NaiveDate,
}

/// An employee.
pub struct Employee {
    pub id: String,
    pub name: String,
    pub role: &'static str,
    pub region: &'static str,
    pub email: String,
    pub hired: NaiveDate,
}

/// A marketing campaign.
pub struct Campaign {
    pub id: String,
    pub name: String,
    pub channel: &'static str,
    pub sent: NaiveDate,
    pub reach: f64,
}

/// Channels: id, name, type.
pub const CHANNELS: &[(&str, &str, &str)] = &[
    ("CH01", "Web shop", "online"),
    ("CH02", "Mobile app", "online"),
    ("CH03", "Retail store", "store"),
    ("CH04", "Field sales", "field"),
    ("CH05", "Partner network", "partner"),
    ("CH06", "Phone sales", "phone"),
];

impl Catalog {
    /// The catalog for a scale and seed.
    pub fn new(scale: f64, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(mix(seed, 1));
        let n_products = ((400.0 * scale.sqrt()) as usize).clamp(60, 1500);
        let price = LogNormal::<f64>::new(3.6, 1.0).expect("valid");
        let products: Vec<Product> = (0..n_products)
            .map(|i| {
                let category = rng.random_range(0..CATEGORIES.len());
                let (cat, subs) = CATEGORIES[category];
                let subcategory = subs[rng.random_range(0..subs.len())];
                let price_cents =
                    (price.sample(&mut rng).clamp(1.5, 4000.0) * 100.0).round() as i64;
                let margin = rng.random_range(0.15..0.55);
                let brand = format!(
                    "{} {}",
                    COMPANY_STEMS[rng.random_range(0..COMPANY_STEMS.len())],
                    "Brand"
                );
                Product {
                    id: format!("P{:05}", 10_000 + i),
                    sku: format!(
                        "{}-{:06}",
                        &cat[..3].to_uppercase(),
                        permute(i as u64, 3) % 1_000_000
                    ),
                    name: format!(
                        "{} {} {}",
                        subcategory,
                        ADJECTIVES[rng.random_range(0..ADJECTIVES.len())],
                        i % 97 + 1
                    ),
                    category,
                    subcategory,
                    brand,
                    price_cents,
                    cost_cents: (price_cents as f64 * (1.0 - margin)).round() as i64,
                    launched: start() - Duration::days(rng.random_range(0..900)),
                }
            })
            .collect();
        let n_emp = ((80.0 * scale.sqrt()) as usize).clamp(18, 400);
        let employees: Vec<Employee> = (0..n_emp)
            .map(|i| {
                let role = match i % 10 {
                    0..=3 => "account_manager",
                    4..=6 => "sales_rep",
                    _ => "service_agent",
                };
                let first = FIRST_NAMES[rng.random_range(0..FIRST_NAMES.len())];
                let last = LAST_NAMES[rng.random_range(0..LAST_NAMES.len())];
                Employee {
                    id: format!("EMP{:04}", 100 + i),
                    name: format!("{first} {last}"),
                    role,
                    region: CITIES[i % CITIES.len()].2,
                    email: format!("{}.{}{}@kbcrm-demo.example", ascii(first), ascii(last), i)
                        .to_lowercase(),
                    hired: start() - Duration::days(rng.random_range(0..3000)),
                }
            })
            .collect();
        let mut campaigns = Vec::new();
        let mut day = start() + Duration::days(20);
        let mut i = 0;
        while day <= end() + Duration::days(HORIZON_DAYS) {
            let channel = ["email", "email", "mail", "sms"][i % 4];
            campaigns.push(Campaign {
                id: format!("CMP{:03}", i + 1),
                name: format!(
                    "{} {}",
                    [
                        "Spring offer",
                        "Summer sale",
                        "Autumn bundle",
                        "Year-end",
                        "New range",
                        "Loyalty bonus"
                    ][i % 6],
                    day.format("%Y-%m")
                ),
                channel,
                sent: day,
                reach: rng.random_range(0.1..0.3),
            });
            day += Duration::days(rng.random_range(25..40));
            i += 1;
        }
        let mut by_category = vec![Vec::new(); CATEGORIES.len()];
        for (i, p) in products.iter().enumerate() {
            by_category[p.category].push(i);
        }
        let mut by_role_region: std::collections::HashMap<_, Vec<usize>> = Default::default();
        let mut by_role: std::collections::HashMap<_, Vec<usize>> = Default::default();
        for (i, e) in employees.iter().enumerate() {
            by_role_region
                .entry((e.role, e.region))
                .or_default()
                .push(i);
            by_role.entry(e.role).or_default().push(i);
        }
        Catalog {
            products,
            employees,
            campaigns,
            by_category,
            by_role_region,
            by_role,
        }
    }

    /// A random product of a category (any product when the category has none).
    pub fn pick_product(&self, rng: &mut ChaCha8Rng, category: usize) -> usize {
        match self.by_category.get(category) {
            Some(c) if !c.is_empty() => c[rng.random_range(0..c.len())],
            _ => rng.random_range(0..self.products.len()),
        }
    }

    /// Employees with a role, in a region when there are any there.
    pub fn pick_employee(
        &self,
        rng: &mut ChaCha8Rng,
        role: &'static str,
        region: &'static str,
    ) -> &Employee {
        let pool = match self.by_role_region.get(&(role, region)) {
            Some(local) => local,
            None => &self.by_role[role],
        };
        &self.employees[pool[rng.random_range(0..pool.len())]]
    }
}

/// Replace umlauts for e-mail addresses.
pub fn ascii(s: &str) -> String {
    s.replace('ä', "ae")
        .replace('ö', "oe")
        .replace('ü', "ue")
        .replace('Ä', "Ae")
        .replace('Ö', "Oe")
        .replace('Ü', "Ue")
        .replace('ß', "ss")
        .replace(' ', "")
}

/// How a customer behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cohort {
    /// Buys often and stays.
    Loyal,
    /// Ordinary buyer who may quietly drop out.
    Regular,
    /// Planted churner: purchases thin out and complaints rise before a churn date.
    Churner,
    /// Acquired in the last months.
    New,
}

impl Cohort {
    /// Name for the truth file.
    pub fn as_str(&self) -> &'static str {
        match self {
            Cohort::Loyal => "loyal",
            Cohort::Regular => "regular",
            Cohort::Churner => "churner",
            Cohort::New => "new",
        }
    }
}

/// Address and contact details that can change once.
#[derive(Debug, Clone)]
pub struct Details {
    pub street: String,
    pub postcode: String,
    pub city: &'static str,
    pub region: &'static str,
    pub email: String,
    pub credit_limit: Option<i64>,
}

/// One true customer.
pub struct Customer {
    pub idx: u64,
    pub true_id: String,
    pub b2b: bool,
    pub company: Option<String>,
    pub first: &'static str,
    pub last: &'static str,
    /// E.164.
    pub phone: String,
    /// Canonical "DE" + 9 digits.
    pub tax_id: Option<String>,
    pub segment: &'static str,
    pub payment_terms: i64,
    pub acquired: NaiveDate,
    pub cohort: Cohort,
    pub churn_date: Option<NaiveDate>,
    pub churn_kind: Option<&'static str>,
    pub erp_id: Option<String>,
    pub crm_ids: Vec<String>,
    pub service_id: Option<String>,
    pub account_manager: String,
    pub details: Details,
    /// A change of details on a day after the history, with the new details.
    pub change: Option<(NaiveDate, Details)>,
    pub favourite: [usize; 2],
    pub orders: Vec<Order>,
    pub tickets: Vec<Ticket>,
    pub feedback: Vec<Feedback>,
    pub touches: Vec<Touch>,
    /// The customer has an account in the service portal without tickets.
    pub service_portal: bool,
}

/// An order.
pub struct Order {
    pub id: String,
    pub ts: NaiveDateTime,
    pub arrival: NaiveDate,
    pub contact: usize,
    pub channel: usize,
    pub rep: Option<String>,
    pub status: &'static str,
    pub lines: Vec<Line>,
    pub invoice: Option<Invoice>,
}

/// An order line.
pub struct Line {
    pub product: usize,
    pub quantity: i64,
    pub unit_price_cents: i64,
    pub discount_pct: i64,
    pub net_cents: i64,
}

/// An invoice and its payment.
pub struct Invoice {
    pub id: String,
    pub date: NaiveDate,
    pub due: NaiveDate,
    pub amount_cents: i64,
    pub paid: Option<(NaiveDate, i64, &'static str)>,
}

/// A service ticket.
pub struct Ticket {
    pub id: String,
    pub opened: NaiveDateTime,
    pub arrival: NaiveDate,
    pub closed: Option<NaiveDateTime>,
    pub category: &'static str,
    pub severity: &'static str,
    pub complaint: bool,
    pub satisfaction: Option<i64>,
    pub agent: String,
    pub channel: &'static str,
    pub order_ref: Option<String>,
}

/// A survey answer, suggestion or other feedback.
pub struct Feedback {
    pub id: String,
    pub kind: &'static str,
    pub ts: NaiveDateTime,
    pub score: Option<i64>,
    pub text: &'static str,
    pub acted_on: bool,
    pub answered: bool,
}

/// A campaign touch.
pub struct Touch {
    pub id: String,
    pub contact: usize,
    pub campaign: usize,
    pub ts: NaiveDateTime,
    pub opened: bool,
    pub clicked: bool,
    pub responded: bool,
}

fn at(day: NaiveDate, rng: &mut ChaCha8Rng, from_h: u32, to_h: u32) -> NaiveDateTime {
    let secs = rng.random_range(from_h * 3600..to_h * 3600);
    day.and_time(NaiveTime::from_num_seconds_from_midnight_opt(secs, 0).unwrap_or(NaiveTime::MIN))
}

fn arrival(day: NaiveDate, rng: &mut ChaCha8Rng) -> NaiveDate {
    if rng.random_bool(0.03) {
        day + Duration::days(rng.random_range(1..=3))
    } else {
        day
    }
}

fn details(rng: &mut ChaCha8Rng, email: String, b2b: bool) -> Details {
    let (city, prefix, region) = CITIES[rng.random_range(0..CITIES.len())];
    Details {
        street: format!(
            "{} {}",
            STREETS[rng.random_range(0..STREETS.len())],
            rng.random_range(1..180)
        ),
        postcode: format!("{prefix}{:03}", rng.random_range(0..1000)),
        city,
        region,
        email,
        credit_limit: b2b.then(|| rng.random_range(5..=200) * 1000),
    }
}

/// The customer's e-mail address: at its company for a business customer, else at a mail
/// provider.
fn email_address(
    rng: &mut ChaCha8Rng,
    idx: u64,
    first: &str,
    last: &str,
    has_company: bool,
) -> String {
    let email = if has_company {
        format!(
            "{}.{}@{}{}.example",
            ascii(first),
            ascii(last),
            "firma",
            permute(idx, 11) % 1_000_000
        )
    } else {
        format!(
            "{}.{}{}@{}",
            ascii(first),
            ascii(last),
            permute(idx, 5) % 100_000,
            MAIL_DOMAINS[rng.random_range(0..MAIL_DOMAINS.len())]
        )
    };
    email.to_lowercase()
}

/// How the customer will behave, by one random roll.
fn draw_cohort(rng: &mut ChaCha8Rng) -> Cohort {
    let roll: f64 = rng.random();
    match roll {
        r if r < 0.15 => Cohort::Loyal,
        r if r < 0.70 => Cohort::Regular,
        r if r < 0.90 => Cohort::Churner,
        _ => Cohort::New,
    }
}

/// The day the customer was acquired, by cohort.
fn draw_acquired(rng: &mut ChaCha8Rng, cohort: Cohort) -> NaiveDate {
    match cohort {
        Cohort::New if rng.random_bool(0.1) => {
            end() + Duration::days(rng.random_range(1..=HORIZON_DAYS))
        }
        Cohort::New => end() - Duration::days(rng.random_range(1..180)),
        Cohort::Loyal => start() - Duration::days(rng.random_range(0..700)),
        _ => start() + Duration::days(rng.random_range(-365..540)),
    }
}

/// The day a churner leaves, some months after its first day in the history.
fn draw_churn_date(
    rng: &mut ChaCha8Rng,
    cohort: Cohort,
    first_day: NaiveDate,
) -> Option<NaiveDate> {
    if cohort != Cohort::Churner {
        return None;
    }
    let lo = (first_day + Duration::days(150)).max(start() + Duration::days(240));
    let hi = end() - Duration::days(60);
    Some(if lo >= hi {
        hi
    } else {
        lo + Duration::days(rng.random_range(0..(hi - lo).num_days().max(1)))
    })
}

/// For some customers, one change of address, e-mail or credit limit on a day after the
/// history: the day and the new details.
fn draw_change(
    rng: &mut ChaCha8Rng,
    base: &Details,
    email: &str,
    b2b: bool,
    idx: u64,
    first: &str,
    last: &str,
) -> Option<(NaiveDate, Details)> {
    if !rng.random_bool(0.3) {
        return None;
    }
    let day = end() + Duration::days(rng.random_range(1..=HORIZON_DAYS));
    let mut d = base.clone();
    match rng.random_range(0..3) {
        0 => {
            let moved = details(rng, email.to_string(), b2b);
            d.street = moved.street;
            d.postcode = moved.postcode;
            d.city = moved.city;
            d.region = moved.region;
        }
        1 => {
            d.email = format!(
                "{}.{}.{}@{}",
                ascii(first),
                ascii(last),
                permute(idx, 17) % 10_000,
                MAIL_DOMAINS[rng.random_range(0..MAIL_DOMAINS.len())]
            )
            .to_lowercase()
        }
        _ => d.credit_limit = d.credit_limit.map(|c| c + 10_000).or(Some(2_000)),
    }
    Some((day, d))
}

/// Simulate customer `idx`.
pub fn customer(idx: u64, seed: u64, catalog: &Catalog) -> Customer {
    let mut rng = ChaCha8Rng::seed_from_u64(mix(seed, 1000 + idx));
    let horizon_end = end() + Duration::days(HORIZON_DAYS);
    let b2b = rng.random_bool(0.55);
    let first = FIRST_NAMES[rng.random_range(0..FIRST_NAMES.len())];
    let last = LAST_NAMES[rng.random_range(0..LAST_NAMES.len())];
    let company = b2b.then(|| {
        format!(
            "{} {} {}",
            COMPANY_STEMS[rng.random_range(0..COMPANY_STEMS.len())],
            LAST_NAMES[rng.random_range(0..LAST_NAMES.len())],
            COMPANY_FORMS[rng.random_range(0..COMPANY_FORMS.len())]
        )
    });
    let email = email_address(&mut rng, idx, first, last, company.is_some());
    let phone = format!("+4915{:08}", permute(idx, 7) % 100_000_000);
    let tax_id = b2b.then(|| format!("DE{:09}", 100_000_000 + permute(idx, 13) % 900_000_000));
    let segment = if b2b {
        [
            "enterprise",
            "mid-market",
            "small business",
            "small business",
        ][rng.random_range(0..4)]
    } else {
        "consumer"
    };
    let cohort = draw_cohort(&mut rng);
    let acquired = draw_acquired(&mut rng, cohort);
    let churn_date = draw_churn_date(&mut rng, cohort, acquired.max(start()));
    let base = details(&mut rng, email.clone(), b2b);
    let change = draw_change(&mut rng, &base, &email, b2b, idx, first, last);
    let in_erp = b2b || rng.random_bool(0.3);
    let n_crm = if rng.random_bool(0.04) { 2 } else { 1 };
    let account_manager = catalog
        .pick_employee(&mut rng, "account_manager", base.region)
        .id
        .clone();
    let cats = CATEGORIES.len();
    let favourite = [rng.random_range(0..cats), rng.random_range(0..cats)];
    let mut c = Customer {
        idx,
        true_id: format!("T{:07}", idx + 1),
        b2b,
        company,
        first,
        last,
        phone,
        tax_id,
        segment,
        payment_terms: if b2b {
            [14, 30, 30, 60][rng.random_range(0..4)]
        } else {
            14
        },
        acquired,
        cohort,
        churn_date,
        churn_kind: churn_date.map(|_| "planted"),
        erp_id: in_erp.then(|| format!("E{:07}", permute(idx, 21))),
        crm_ids: (0..n_crm)
            .map(|j| format!("C{:07}", permute(idx * 2 + j, 23)))
            .collect(),
        service_id: None,
        account_manager,
        details: base,
        change,
        favourite,
        orders: Vec::new(),
        tickets: Vec::new(),
        feedback: Vec::new(),
        touches: Vec::new(),
        service_portal: rng.random_bool(0.1),
    };
    simulate_orders(&mut c, &mut rng, catalog, horizon_end);
    simulate_service(&mut c, &mut rng, catalog, horizon_end);
    simulate_touches(&mut c, &mut rng, catalog);
    if !c.tickets.is_empty() || !c.feedback.is_empty() || c.service_portal {
        c.service_id = Some(format!("S{:07}", permute(idx, 29)));
    }
    c
}
