//! A customer's life simulated day by day: orders and their lines, invoices, service tickets,
//! feedback and marketing touches.

use super::*;

/// Purchase rate per week, and dropout probability per purchase.
pub(super) fn behaviour(c: &Customer, rng: &mut ChaCha8Rng) -> (f64, f64) {
    let gamma = |shape: f64, scale: f64, rng: &mut ChaCha8Rng| {
        Gamma::new(shape, scale).expect("valid").sample(rng)
    };
    match c.cohort {
        Cohort::Loyal => (gamma(4.0, 0.09, rng), 0.0),
        Cohort::Churner => (gamma(3.0, 0.08, rng), 0.0),
        Cohort::Regular | Cohort::New => (
            gamma(2.0, 0.07, rng),
            Beta::new(1.0, 40.0).expect("valid").sample(rng),
        ),
    }
}

pub(super) fn simulate_orders(
    c: &mut Customer,
    rng: &mut ChaCha8Rng,
    catalog: &Catalog,
    horizon_end: NaiveDate,
) {
    let (lambda, dropout) = behaviour(c, rng);
    let mut t = c.acquired.max(start()).and_time(NaiveTime::MIN);
    let mut k = 0u32;
    let terms = c.payment_terms;
    loop {
        // Weekly rate; planted churners slow down in the 120 days before their churn date.
        let mut rate = lambda.max(0.004);
        if let Some(cd) = c.churn_date {
            let left = (cd - t.date()).num_days();
            if left < 120 {
                rate *= (left.max(0) as f64 / 120.0).max(0.12);
            }
        }
        let wait_days = -((1.0 - rng.random::<f64>()).ln()) / rate * 7.0;
        t += Duration::seconds((wait_days * 86_400.0) as i64);
        let day = t.date();
        if day > horizon_end || c.churn_date.is_some_and(|cd| day >= cd) {
            break;
        }
        let ts = at(day, rng, 7, 21);
        let order = make_order(c, rng, catalog, ts, k, terms);
        c.orders.push(order);
        k += 1;
        if dropout > 0.0 && rng.random_bool(dropout) {
            if day <= end() {
                c.churn_date = Some(day + Duration::days(1));
                c.churn_kind = Some("natural");
            }
            break;
        }
    }
}

pub(super) fn make_order(
    c: &Customer,
    rng: &mut ChaCha8Rng,
    catalog: &Catalog,
    ts: NaiveDateTime,
    k: u32,
    terms: i64,
) -> Order {
    let channel = if c.b2b {
        [3, 3, 0, 0, 0, 0, 5, 5, 4, 4][rng.random_range(0..10)]
    } else {
        [0, 0, 0, 0, 0, 1, 1, 1, 2, 2][rng.random_range(0..10)]
    };
    let rep = matches!(channel, 3..=5).then(|| {
        if rng.random_bool(0.7) {
            c.account_manager.clone()
        } else {
            catalog
                .pick_employee(rng, "sales_rep", c.details.region)
                .id
                .clone()
        }
    });
    let status = match rng.random_range(0..100) {
        0..=2 => "cancelled",
        3..=4 => "returned",
        _ => "completed",
    };
    let n_lines = 1 + (-(1.0 - rng.random::<f64>()).ln() * 1.9) as usize;
    let lines = (0..n_lines.min(12))
        .map(|_| {
            let category = if rng.random_bool(0.7) {
                c.favourite[rng.random_range(0..2)]
            } else {
                rng.random_range(0..CATEGORIES.len())
            };
            let product = catalog.pick_product(rng, category);
            let quantity = if c.b2b {
                1 + (-(1.0 - rng.random::<f64>()).ln() * 6.0) as i64
            } else {
                rng.random_range(1..=3)
            };
            let unit_price_cents = catalog.products[product].price_cents;
            let discount_pct = match (c.b2b, c.cohort) {
                (true, Cohort::Loyal) => rng.random_range(5..=15),
                (true, _) => rng.random_range(0..=10),
                (false, _) => [0, 0, 0, 5, 10][rng.random_range(0..5)],
            };
            let gross = quantity * unit_price_cents;
            let net_cents = (gross as f64 * (100 - discount_pct) as f64 / 100.0).round() as i64;
            Line {
                product,
                quantity,
                unit_price_cents,
                discount_pct,
                net_cents,
            }
        })
        .collect::<Vec<_>>();
    let id = format!("SO{:07}{:04}", permute(c.idx, 31), k);
    let invoice = (c.erp_id.is_some() && status != "cancelled").then(|| {
        let date = ts.date() + Duration::days(rng.random_range(0..=2));
        let due = date + Duration::days(terms);
        let amount_cents: i64 = lines.iter().map(|l| l.net_cents).sum();
        let late = c.churn_date.is_some_and(|cd| (cd - date).num_days() < 120);
        let delay = if late {
            rng.random_range(10..70)
        } else {
            Normal::<f64>::new(-3.0, 6.0)
                .expect("valid")
                .sample(rng)
                .round() as i64
        };
        let paid = (!rng.random_bool(if late { 0.15 } else { 0.02 })).then(|| {
            let method = ["bank_transfer", "direct_debit", "card"][rng.random_range(0..3)];
            let amount = if rng.random_bool(0.02) {
                amount_cents / 2
            } else {
                amount_cents
            };
            ((due + Duration::days(delay)).max(date), amount, method)
        });
        Invoice {
            id: format!("INV{}", &id[2..]),
            date,
            due,
            amount_cents,
            paid,
        }
    });
    Order {
        arrival: arrival(ts.date(), rng),
        id,
        ts,
        contact: rng.random_range(0..c.crm_ids.len()),
        channel,
        rep,
        status,
        lines,
        invoice,
    }
}

pub(super) fn simulate_service(
    c: &mut Customer,
    rng: &mut ChaCha8Rng,
    catalog: &Catalog,
    horizon_end: NaiveDate,
) {
    let first_day = c.acquired.max(start());
    let years = ((horizon_end - first_day).num_days().max(1)) as f64 / 365.0;
    let base_rate = if c.b2b { 0.9 } else { 0.5 };
    let n = (base_rate * years * rng.random_range(0.3..1.7)).round() as i64;
    let mut days: Vec<NaiveDate> = (0..n)
        .map(|_| {
            first_day
                + Duration::days(rng.random_range(0..(horizon_end - first_day).num_days().max(1)))
        })
        .collect();
    // Planted churners: a burst of complaints in the months before they leave.
    if let Some(cd) = c.churn_date.filter(|_| c.churn_kind == Some("planted")) {
        for _ in 0..rng.random_range(2..=4) {
            let d = cd - Duration::days(rng.random_range(5..150));
            if d >= first_day {
                days.push(d);
            }
        }
    }
    days.sort();
    for (k, day) in days.into_iter().enumerate() {
        if c.churn_date.is_some_and(|cd| day > cd + Duration::days(20)) {
            continue;
        }
        let troubled = c
            .churn_date
            .is_some_and(|cd| c.churn_kind == Some("planted") && (cd - day).num_days() < 160);
        let opened = at(day, rng, 7, 22);
        let complaint = rng.random_bool(if troubled { 0.75 } else { 0.15 });
        let hours = LogNormal::new(if troubled { 3.8 } else { 2.8 }, 0.8)
            .expect("valid")
            .sample(rng);
        let closed_at = opened + Duration::minutes((hours * 60.0) as i64);
        let closed = (!(troubled && rng.random_bool(0.35)) && closed_at.date() <= horizon_end)
            .then_some(closed_at);
        let satisfaction = (closed.is_some() && rng.random_bool(0.6)).then(|| {
            if troubled {
                rng.random_range(1..=3)
            } else {
                [3, 4, 4, 5, 5][rng.random_range(0..5)]
            }
        });
        let order_ref = (!c.orders.is_empty() && rng.random_bool(0.5))
            .then(|| {
                let before: Vec<&Order> = c.orders.iter().filter(|o| o.ts < opened).collect();
                before.last().map(|o| o.id.clone())
            })
            .flatten();
        c.tickets.push(Ticket {
            id: format!("TK{:07}{:03}", permute(c.idx, 37), k),
            arrival: arrival(day, rng),
            opened,
            closed,
            category: TICKET_CATEGORIES[rng.random_range(0..TICKET_CATEGORIES.len())],
            severity: ["low", "medium", "medium", "high", "critical"]
                [rng.random_range(if troubled { 2 } else { 0 }..5)],
            complaint,
            satisfaction,
            agent: catalog
                .pick_employee(rng, "service_agent", c.details.region)
                .id
                .clone(),
            channel: ["email", "phone", "chat", "web"][rng.random_range(0..4)],
            order_ref,
        });
        if rng.random_bool(0.3) {
            let ts = opened + Duration::days(rng.random_range(1..5));
            let score = if troubled {
                rng.random_range(0..=5)
            } else {
                rng.random_range(5..=10)
            };
            push_feedback(c, rng, "survey", ts, Some(score));
        }
    }
    // Suggestions and praise from engaged customers.
    let engaged = match c.cohort {
        Cohort::Loyal => 0.6,
        Cohort::Churner => 0.1,
        _ => 0.2,
    };
    let n = (engaged * years * rng.random_range(0.0..2.0)).round() as i64;
    for _ in 0..n {
        let day = first_day
            + Duration::days(rng.random_range(0..(horizon_end - first_day).num_days().max(1)));
        if c.churn_date.is_some_and(|cd| day > cd) {
            continue;
        }
        let kind = if rng.random_bool(0.6) {
            "suggestion"
        } else {
            "praise"
        };
        let ts = at(day, rng, 8, 20);
        push_feedback(c, rng, kind, ts, None);
    }
}

pub(super) fn push_feedback(
    c: &mut Customer,
    rng: &mut ChaCha8Rng,
    kind: &'static str,
    ts: NaiveDateTime,
    score: Option<i64>,
) {
    let text = match kind {
        "suggestion" => SUGGESTIONS[rng.random_range(0..SUGGESTIONS.len())],
        _ => FEEDBACK_TEXTS[rng.random_range(0..FEEDBACK_TEXTS.len())],
    };
    let k = c.feedback.len();
    c.feedback.push(Feedback {
        id: format!("FB{:07}{:03}", permute(c.idx, 41), k),
        kind,
        ts,
        score,
        text,
        acted_on: kind == "suggestion" && rng.random_bool(0.35),
        answered: rng.random_bool(0.7),
    });
}

pub(super) fn simulate_touches(c: &mut Customer, rng: &mut ChaCha8Rng, catalog: &Catalog) {
    let first_day = c.acquired.max(start());
    for (i, camp) in catalog.campaigns.iter().enumerate() {
        if camp.sent < first_day
            || c.churn_date
                .is_some_and(|cd| camp.sent > cd + Duration::days(90))
        {
            continue;
        }
        if !rng.random_bool(camp.reach) {
            continue;
        }
        let opened = rng.random_bool(if c.cohort == Cohort::Loyal { 0.5 } else { 0.25 });
        let clicked = opened && rng.random_bool(0.3);
        let responded =
            clicked && rng.random_bool(if c.cohort == Cohort::Loyal { 0.4 } else { 0.15 });
        c.touches.push(Touch {
            id: format!("TC{:07}{:03}", permute(c.idx, 43), i),
            contact: rng.random_range(0..c.crm_ids.len()),
            campaign: i,
            ts: at(camp.sent, rng, 6, 10),
            opened,
            clicked,
            responded,
        });
    }
}
