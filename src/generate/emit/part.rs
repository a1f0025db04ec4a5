//! One part of the customers: every per-customer file of a batch written side by side.

use super::*;

/// One part of the customers: every per-customer file of the batch.
pub fn part(
    root: &Path,
    catalog: &Catalog,
    seed: u64,
    batch: u32,
    part: usize,
    customers: Range<usize>,
) -> Result<PartOutput> {
    let mut f = Files {
        root: root.to_path_buf(),
        seed,
        batch,
        counts: Vec::new(),
        malformed: Vec::new(),
    };
    let sfx = format!("{batch:04}_p{part:02}");
    let on = Damage {
        enabled: true,
        ..Damage::default()
    };
    let (mut erp_c, mut r_erp_c) = f.open(
        &format!("erp/customers/customers_{sfx}.csv"),
        &[
            "erp_customer_id",
            "legal_name",
            "tax_id",
            "email",
            "phone",
            "street",
            "postcode",
            "city",
            "country",
            "region",
            "segment",
            "credit_limit",
            "payment_terms_days",
            "created_at",
            "updated_at",
        ],
        false,
        Damage::default(),
    )?;
    let (mut inv, mut r_inv) = f.open(
        &format!("erp/invoices/invoices_{sfx}.csv"),
        &[
            "invoice_id",
            "erp_customer_id",
            "order_ref",
            "invoice_date",
            "due_date",
            "amount",
            "currency",
        ],
        false,
        Damage {
            id: Some(0),
            number: Some(5),
            date: Some(3),
            ..on
        },
    )?;
    let (mut pay, mut r_pay) = f.open(
        &format!("erp/payments/payments_{sfx}.csv"),
        &[
            "payment_id",
            "invoice_id",
            "erp_customer_id",
            "paid_date",
            "amount",
            "method",
        ],
        false,
        Damage {
            id: Some(0),
            number: Some(4),
            date: Some(3),
            ..on
        },
    )?;
    let (mut con, mut r_con) = f.open(
        &format!("sales/contacts/contacts_{sfx}.ndjson"),
        &[
            "contact_id",
            "first_name",
            "last_name",
            "company",
            "email",
            "phone",
            "postcode",
            "city",
            "country",
            "owner_id",
            "created_at",
            "updated_at",
        ],
        true,
        Damage::default(),
    )?;
    let (mut ord, mut r_ord) = f.open(
        &format!("sales/orders/orders_{sfx}.csv"),
        &[
            "order_id",
            "contact_id",
            "order_ts",
            "channel_id",
            "sales_rep_id",
            "status",
            "currency",
        ],
        false,
        Damage {
            id: Some(0),
            date: Some(2),
            ..on
        },
    )?;
    let (mut lin, mut r_lin) = f.open(
        &format!("sales/order_lines/order_lines_{sfx}.csv"),
        &[
            "order_id",
            "line_no",
            "product_id",
            "quantity",
            "unit_price",
            "discount_pct",
            "net_amount",
        ],
        false,
        Damage {
            id: Some(0),
            number: Some(6),
            ..on
        },
    )?;
    let (mut tou, mut r_tou) = f.open(
        &format!("sales/campaign_touches/touches_{sfx}.csv"),
        &[
            "touch_id",
            "contact_id",
            "campaign_id",
            "sent_at",
            "opened",
            "clicked",
            "responded",
        ],
        false,
        Damage {
            id: Some(0),
            date: Some(3),
            ..on
        },
    )?;
    let (mut svc, mut r_svc) = f.open(
        &format!("service/customers/service_customers_{sfx}.csv"),
        &[
            "service_customer_id",
            "name",
            "company",
            "email",
            "phone",
            "created_at",
        ],
        false,
        Damage::default(),
    )?;
    let (mut tic, mut r_tic) = f.open(
        &format!("service/tickets/tickets_{sfx}.ndjson"),
        &[
            "ticket_id",
            "service_customer_id",
            "opened_at",
            "closed_at",
            "category",
            "severity",
            "complaint",
            "satisfaction",
            "resolution_hours",
            "agent_id",
            "channel",
            "order_ref",
        ],
        true,
        Damage {
            id: Some(0),
            number: Some(7),
            date: Some(2),
            ..on
        },
    )?;
    let (mut fbk, mut r_fbk) = f.open(
        &format!("service/feedback/feedback_{sfx}.csv"),
        &[
            "feedback_id",
            "service_customer_id",
            "kind",
            "submitted_at",
            "score",
            "text",
            "acted_on",
            "answered",
        ],
        false,
        Damage {
            id: Some(0),
            date: Some(3),
            ..on
        },
    )?;
    let mut identity = Vec::new();
    let mut truth = Vec::new();
    let mut changes = Vec::new();
    for idx in customers {
        let c = world::customer(idx as u64, seed, catalog);
        identity_rows(&c, &mut identity);
        truth.push(truth_row(&c));
        if let Some(kind) = visible_change(&c, batch) {
            changes.push((c.true_id.clone(), kind));
        }
        // Masters: batch 1 holds customers acquired by the end of the history, as they stood
        // then; later batches hold customers acquired or changed on their day.
        let (write_master, details) = master_state(&c, batch);
        let created = c.acquired.min(end());
        if write_master {
            if let Some(erp_id) = &c.erp_id {
                let legal = c
                    .company
                    .clone()
                    .unwrap_or_else(|| format!("{} {}", c.first, c.last));
                let updated = if batch == 1 {
                    created + chrono::Duration::days((c.idx % 200) as i64).min(end() - created)
                } else {
                    batch_day(batch)
                };
                let tax = c.tax_id.as_ref().map(|t| tax_variant(&mut r_erp_c, t));
                let email = email_variant(&mut r_erp_c, &details.email);
                let phone = phone_variant(&mut r_erp_c, &c.phone);
                erp_c.row(
                    &mut r_erp_c,
                    &mut [
                        o(erp_id),
                        o(legal),
                        tax,
                        o(email),
                        o(phone),
                        o(&details.street),
                        o(&details.postcode),
                        o(details.city),
                        o("DE"),
                        o(details.region),
                        o(c.segment),
                        details.credit_limit.map(|l| l.to_string()),
                        o(c.payment_terms),
                        o(ymd(c.acquired)),
                        o(ymd(updated)),
                    ],
                )?;
            }
            for (j, crm_id) in c.crm_ids.iter().enumerate() {
                // A duplicate contact often uses another address (work vs. private).
                let email = if j == 1 && r_con.random_bool(0.5) {
                    let (local, _) = details
                        .email
                        .split_once('@')
                        .unwrap_or((&details.email, ""));
                    format!("{local}.privat@mail.de")
                } else {
                    details.email.clone()
                };
                let email = if j == 1 && email != details.email {
                    email
                } else {
                    email_variant(&mut r_con, &email)
                };
                let phone = phone_variant(&mut r_con, &c.phone);
                con.row(
                    &mut r_con,
                    &mut [
                        o(crm_id),
                        o(c.first),
                        o(c.last),
                        c.company.clone(),
                        o(email),
                        o(phone),
                        o(&details.postcode),
                        o(details.city),
                        o("DE"),
                        o(&c.account_manager),
                        o(iso(created.and_hms_opt(9, 0, 0).expect("valid"))),
                        o(iso(if batch == 1 {
                            created
                        } else {
                            batch_day(batch)
                        }
                        .and_hms_opt(18, 0, 0)
                        .expect("valid"))),
                    ],
                )?;
            }
        }
        if let Some(sid) = &c.service_id {
            let first = c
                .tickets
                .iter()
                .map(|t| t.opened.date())
                .chain(c.feedback.iter().map(|f| f.ts.date()))
                .min()
                .unwrap_or(c.acquired)
                .min(c.acquired.max(world::start()));
            if in_batch(first, batch) || (batch > 1 && write_master) {
                let email = if r_svc.random_bool(0.85) {
                    o(email_variant(&mut r_svc, &details.email))
                } else {
                    None
                };
                let phone = phone_variant(&mut r_svc, &c.phone);
                svc.row(
                    &mut r_svc,
                    &mut [
                        o(sid),
                        o(format!("{} {}", c.first, c.last)),
                        c.company.clone(),
                        email,
                        o(phone),
                        o(ymd(first)),
                    ],
                )?;
            }
        }
        for order in &c.orders {
            if !in_batch(order.arrival, batch) {
                continue;
            }
            ord.row(
                &mut r_ord,
                &mut [
                    o(&order.id),
                    o(&c.crm_ids[order.contact]),
                    o(ts(order.ts)),
                    o(CHANNELS[order.channel].0),
                    order.rep.clone(),
                    o(order.status),
                    o("EUR"),
                ],
            )?;
            for (n, l) in order.lines.iter().enumerate() {
                lin.row(
                    &mut r_lin,
                    &mut [
                        o(&order.id),
                        o(n + 1),
                        o(&catalog.products[l.product].id),
                        o(l.quantity),
                        o(money(l.unit_price_cents)),
                        o(l.discount_pct),
                        o(money(l.net_cents)),
                    ],
                )?;
            }
        }
        if let Some(erp_id) = &c.erp_id {
            for order in &c.orders {
                let Some(i) = &order.invoice else { continue };
                if in_batch(i.date, batch) {
                    inv.row(
                        &mut r_inv,
                        &mut [
                            o(&i.id),
                            o(erp_id),
                            o(&order.id),
                            o(de_date(i.date)),
                            o(de_date(i.due)),
                            o(money(i.amount_cents)),
                            o("EUR"),
                        ],
                    )?;
                }
                if let Some((paid, amount, method)) = i.paid
                    && in_batch(paid, batch)
                {
                    pay.row(
                        &mut r_pay,
                        &mut [
                            o(format!("PAY{}", &i.id[3..])),
                            o(&i.id),
                            o(erp_id),
                            o(de_date(paid)),
                            o(money(amount)),
                            o(method),
                        ],
                    )?;
                }
            }
        }
        for t in &c.touches {
            if in_batch(t.ts.date(), batch) {
                tou.row(
                    &mut r_tou,
                    &mut [
                        o(&t.id),
                        o(&c.crm_ids[t.contact]),
                        o(&catalog.campaigns[t.campaign].id),
                        o(ts(t.ts)),
                        o(t.opened),
                        o(t.clicked),
                        o(t.responded),
                    ],
                )?;
            }
        }
        let Some(sid) = &c.service_id else { continue };
        for t in &c.tickets {
            if !in_batch(t.arrival, batch) {
                continue;
            }
            let cutoff = batch_day(batch).and_hms_opt(23, 59, 59).expect("valid");
            let closed = t.closed.filter(|c| *c <= cutoff);
            let hours =
                closed.map(|c| format!("{:.1}", (c - t.opened).num_minutes() as f64 / 60.0));
            tic.row(
                &mut r_tic,
                &mut [
                    o(&t.id),
                    o(sid),
                    o(iso(t.opened)),
                    closed.map(iso),
                    o(t.category),
                    o(t.severity),
                    o(t.complaint),
                    if closed.is_some() {
                        t.satisfaction.map(|s| s.to_string())
                    } else {
                        None
                    },
                    hours,
                    o(&t.agent),
                    o(t.channel),
                    t.order_ref.clone(),
                ],
            )?;
        }
        for fb in &c.feedback {
            if in_batch(fb.ts.date(), batch) {
                fbk.row(
                    &mut r_fbk,
                    &mut [
                        o(&fb.id),
                        o(sid),
                        o(fb.kind),
                        o(ts(fb.ts)),
                        fb.score.map(|s| s.to_string()),
                        o(fb.text),
                        o(fb.acted_on),
                        o(fb.answered),
                    ],
                )?;
            }
        }
    }
    for s in [erp_c, inv, pay, con, ord, lin, tou, svc, tic, fbk] {
        f.close(s)?;
    }
    Ok(PartOutput {
        files: f.counts,
        malformed: f.malformed,
        identity,
        truth,
        changes,
    })
}
