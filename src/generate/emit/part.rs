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
    let mut files = PartFiles::open(&f, &format!("{batch:04}_p{part:02}"))?;
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
        files.write_customer(&c, batch, catalog)?;
    }
    files.close(&mut f)?;
    Ok(PartOutput {
        files: f.counts,
        malformed: f.malformed,
        identity,
        truth,
        changes,
    })
}

/// One file of the part and the random stream that varies what is written to it.
struct Out {
    sink: Sink,
    rng: ChaCha8Rng,
}

impl Out {
    /// Opens one file of the part with its random stream.
    fn open(
        f: &Files,
        rel: &str,
        cols: &[&'static str],
        json: bool,
        damage: Damage,
    ) -> Result<Self> {
        let (sink, rng) = f.open(rel, cols, json, damage)?;
        Ok(Out { sink, rng })
    }

    /// Writes one row.
    fn row(&mut self, fields: &mut [Option<String>]) -> Result<()> {
        self.sink.row(&mut self.rng, fields)
    }
}

/// Every per-customer file of the part, in the order they are opened and closed.
struct PartFiles {
    erp_customers: Out,
    invoices: Out,
    payments: Out,
    contacts: Out,
    orders: Out,
    order_lines: Out,
    touches: Out,
    service_customers: Out,
    tickets: Out,
    feedback: Out,
}

/// Damage that may be planted in transactional files.
fn transactional() -> Damage {
    Damage {
        enabled: true,
        ..Damage::default()
    }
}

impl PartFiles {
    /// Opens every file of the part; `sfx` names the batch and part.
    fn open(f: &Files, sfx: &str) -> Result<Self> {
        let (erp_customers, invoices, payments) = open_erp(f, sfx)?;
        let (contacts, orders, order_lines, touches) = open_sales(f, sfx)?;
        let (service_customers, tickets, feedback) = open_service(f, sfx)?;
        Ok(PartFiles {
            erp_customers,
            invoices,
            payments,
            contacts,
            orders,
            order_lines,
            touches,
            service_customers,
            tickets,
            feedback,
        })
    }

    /// Closes every file in the order they were opened, recording their counts in `f`.
    fn close(self, f: &mut Files) -> Result<()> {
        for out in [
            self.erp_customers,
            self.invoices,
            self.payments,
            self.contacts,
            self.orders,
            self.order_lines,
            self.touches,
            self.service_customers,
            self.tickets,
            self.feedback,
        ] {
            f.close(out.sink)?;
        }
        Ok(())
    }

    /// Every row of one customer that belongs in batch `batch`.
    fn write_customer(&mut self, c: &Customer, batch: u32, catalog: &Catalog) -> Result<()> {
        // Masters: batch 1 holds customers acquired by the end of the history, as they stood
        // then; later batches hold customers acquired or changed on their day.
        let (write_master, details) = master_state(c, batch);
        if write_master {
            self.write_erp_customer(c, batch, &details)?;
            self.write_contacts(c, batch, &details)?;
        }
        self.write_service_customer(c, batch, write_master, &details)?;
        self.write_orders(c, batch, catalog)?;
        self.write_invoices(c, batch)?;
        self.write_touches(c, batch, catalog)?;
        if let Some(sid) = &c.service_id {
            self.write_tickets(c, batch, sid)?;
            self.write_feedback(c, batch, sid)?;
        }
        Ok(())
    }

    /// The customer's ERP master record, when it has one.
    fn write_erp_customer(&mut self, c: &Customer, batch: u32, details: &Details) -> Result<()> {
        let Some(erp_id) = &c.erp_id else {
            return Ok(());
        };
        let created = c.acquired.min(end());
        let legal = c
            .company
            .clone()
            .unwrap_or_else(|| format!("{} {}", c.first, c.last));
        let updated = if batch == 1 {
            created + chrono::Duration::days((c.idx % 200) as i64).min(end() - created)
        } else {
            batch_day(batch)
        };
        let out = &mut self.erp_customers;
        let tax = c.tax_id.as_ref().map(|t| tax_variant(&mut out.rng, t));
        let email = email_variant(&mut out.rng, &details.email);
        let phone = phone_variant(&mut out.rng, &c.phone);
        out.row(&mut [
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
        ])
    }

    /// The customer's CRM contacts, one per CRM id.
    fn write_contacts(&mut self, c: &Customer, batch: u32, details: &Details) -> Result<()> {
        let created = c.acquired.min(end());
        let out = &mut self.contacts;
        for (j, crm_id) in c.crm_ids.iter().enumerate() {
            // A duplicate contact often uses another address (work vs. private).
            let email = if j == 1 && out.rng.random_bool(0.5) {
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
                email_variant(&mut out.rng, &email)
            };
            let phone = phone_variant(&mut out.rng, &c.phone);
            out.row(&mut [
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
            ])?;
        }
        Ok(())
    }

    /// The customer's service record, in the batch of its first ticket or feedback, and again
    /// in a later batch whose masters hold the customer.
    fn write_service_customer(
        &mut self,
        c: &Customer,
        batch: u32,
        write_master: bool,
        details: &Details,
    ) -> Result<()> {
        let Some(sid) = &c.service_id else {
            return Ok(());
        };
        let first = c
            .tickets
            .iter()
            .map(|t| t.opened.date())
            .chain(c.feedback.iter().map(|f| f.ts.date()))
            .min()
            .unwrap_or(c.acquired)
            .min(c.acquired.max(world::start()));
        if !(in_batch(first, batch) || (batch > 1 && write_master)) {
            return Ok(());
        }
        let out = &mut self.service_customers;
        let email = if out.rng.random_bool(0.85) {
            o(email_variant(&mut out.rng, &details.email))
        } else {
            None
        };
        let phone = phone_variant(&mut out.rng, &c.phone);
        out.row(&mut [
            o(sid),
            o(format!("{} {}", c.first, c.last)),
            c.company.clone(),
            email,
            o(phone),
            o(ymd(first)),
        ])
    }

    /// The customer's orders arriving in the batch, with their lines.
    fn write_orders(&mut self, c: &Customer, batch: u32, catalog: &Catalog) -> Result<()> {
        for order in &c.orders {
            if !in_batch(order.arrival, batch) {
                continue;
            }
            self.orders.row(&mut [
                o(&order.id),
                o(&c.crm_ids[order.contact]),
                o(ts(order.ts)),
                o(CHANNELS[order.channel].0),
                order.rep.clone(),
                o(order.status),
                o("EUR"),
            ])?;
            for (n, l) in order.lines.iter().enumerate() {
                self.order_lines.row(&mut [
                    o(&order.id),
                    o(n + 1),
                    o(&catalog.products[l.product].id),
                    o(l.quantity),
                    o(money(l.unit_price_cents)),
                    o(l.discount_pct),
                    o(money(l.net_cents)),
                ])?;
            }
        }
        Ok(())
    }

    /// The invoices and payments of an ERP customer that fall in the batch.
    fn write_invoices(&mut self, c: &Customer, batch: u32) -> Result<()> {
        let Some(erp_id) = &c.erp_id else {
            return Ok(());
        };
        for order in &c.orders {
            let Some(i) = &order.invoice else { continue };
            if in_batch(i.date, batch) {
                self.invoices.row(&mut [
                    o(&i.id),
                    o(erp_id),
                    o(&order.id),
                    o(de_date(i.date)),
                    o(de_date(i.due)),
                    o(money(i.amount_cents)),
                    o("EUR"),
                ])?;
            }
            if let Some((paid, amount, method)) = i.paid
                && in_batch(paid, batch)
            {
                self.payments.row(&mut [
                    o(format!("PAY{}", &i.id[3..])),
                    o(&i.id),
                    o(erp_id),
                    o(de_date(paid)),
                    o(money(amount)),
                    o(method),
                ])?;
            }
        }
        Ok(())
    }

    /// The customer's campaign touches in the batch.
    fn write_touches(&mut self, c: &Customer, batch: u32, catalog: &Catalog) -> Result<()> {
        for t in &c.touches {
            if in_batch(t.ts.date(), batch) {
                self.touches.row(&mut [
                    o(&t.id),
                    o(&c.crm_ids[t.contact]),
                    o(&catalog.campaigns[t.campaign].id),
                    o(ts(t.ts)),
                    o(t.opened),
                    o(t.clicked),
                    o(t.responded),
                ])?;
            }
        }
        Ok(())
    }

    /// The customer's tickets arriving in the batch, closed only if closed by its end.
    fn write_tickets(&mut self, c: &Customer, batch: u32, sid: &str) -> Result<()> {
        for t in &c.tickets {
            if !in_batch(t.arrival, batch) {
                continue;
            }
            let cutoff = batch_day(batch).and_hms_opt(23, 59, 59).expect("valid");
            let closed = t.closed.filter(|c| *c <= cutoff);
            let hours =
                closed.map(|c| format!("{:.1}", (c - t.opened).num_minutes() as f64 / 60.0));
            self.tickets.row(&mut [
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
            ])?;
        }
        Ok(())
    }

    /// The customer's feedback in the batch.
    fn write_feedback(&mut self, c: &Customer, batch: u32, sid: &str) -> Result<()> {
        for fb in &c.feedback {
            if in_batch(fb.ts.date(), batch) {
                self.feedback.row(&mut [
                    o(&fb.id),
                    o(sid),
                    o(fb.kind),
                    o(ts(fb.ts)),
                    fb.score.map(|s| s.to_string()),
                    o(fb.text),
                    o(fb.acted_on),
                    o(fb.answered),
                ])?;
            }
        }
        Ok(())
    }
}

/// The ERP files: customers, invoices, payments.
fn open_erp(f: &Files, sfx: &str) -> Result<(Out, Out, Out)> {
    let on = transactional();
    let erp_c = Out::open(
        f,
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
    let inv = Out::open(
        f,
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
    let pay = Out::open(
        f,
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
    Ok((erp_c, inv, pay))
}

/// The sales files: contacts, orders, order lines, campaign touches.
fn open_sales(f: &Files, sfx: &str) -> Result<(Out, Out, Out, Out)> {
    let on = transactional();
    let con = Out::open(
        f,
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
    let ord = Out::open(
        f,
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
    let lin = Out::open(
        f,
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
    let tou = Out::open(
        f,
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
    Ok((con, ord, lin, tou))
}

/// The service files: customers, tickets, feedback.
fn open_service(f: &Files, sfx: &str) -> Result<(Out, Out, Out)> {
    let on = transactional();
    let svc = Out::open(
        f,
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
    let tic = Out::open(
        f,
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
    let fbk = Out::open(
        f,
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
    Ok((svc, tic, fbk))
}
