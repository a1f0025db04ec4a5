//! The cubes: values on a dozen hand-made customers, written out below, and the churn warning
//! scored against the generator's planted churners.

use std::collections::HashMap;

use crate::support::{Project, run_in, stderr, stdout};

const AS_OF: &str = "2025-06-30";

/// (customer, days before the as-of date of each completed order, amount of each order).
const ORDERS: &[(&str, &[i64], i64)] = &[
    ("C01", &[394, 81, 61, 41, 20, 5], 1000),
    ("C02", &[300, 170, 150, 100, 10], 800),
    ("C03", &[500, 300, 100, 20], 2000),
    ("C04", &[400, 200, 30], 300),
    ("C05", &[200, 45], 150),
    ("C06", &[600, 400, 250, 120, 60], 500),
    ("C07", &[700, 500, 300, 100], 750),
    ("C08", &[365, 150], 250),
    ("C09", &[420, 376, 332, 288, 244, 200], 800),
    ("C10", &[900, 650, 400], 500),
    ("C11", &[500], 100),
    ("C12", &[15], 200),
];

fn day(offset: i64) -> String {
    let d = chrono::NaiveDate::parse_from_str(AS_OF, "%Y-%m-%d").unwrap()
        - chrono::Duration::days(offset);
    d.to_string()
}

/// The star-schema tables the cubes read, as small CSV files loaded under their star names.
fn fixture() -> Project {
    let p = Project::empty();
    let mut sales = String::from(
        "order_id,line_no,order_ts,customer_key,customer_id,product_id,channel_id,status,net_amount,margin_amount\n",
    );
    for (c, days, amount) in ORDERS {
        for (i, d) in days.iter().enumerate() {
            let product = if i % 2 == 0 { "P1" } else { "P2" };
            sales.push_str(&format!(
                "{c}-{i},1,{} 10:00:00,{},{c},{product},CH01,completed,{amount}.00,{}.00\n",
                day(*d),
                &c[1..],
                amount * 3 / 10
            ));
        }
    }
    // A cancelled order counts nowhere.
    sales.push_str(&format!(
        "C12-x,1,{} 10:00:00,12,C12,P1,CH01,cancelled,9999.00,0.00\n",
        day(3)
    ));
    p.write("data/fact_sales.csv", sales);
    let mut customers = String::from(
        "customer_key,customer_id,customer_name,segment,region,credit_limit,account_manager_id,is_current,valid_from,valid_to\n",
    );
    for (c, _, _) in ORDERS {
        let region = if *c < "C07" { "North" } else { "South" };
        customers.push_str(&format!(
            "{},{c},Customer {c},small business,{region},1800.00,E1,true,1900-01-01 00:00:00,2199-12-31 23:59:59\n",
            &c[1..]
        ));
    }
    p.write("data/dim_customer.csv", customers);
    p.write(
        "data/dim_product.csv",
        "product_id,category\nP1,Office\nP2,Coffee\n",
    );
    p.write(
        "data/dim_channel.csv",
        "channel_id,channel_name\nCH01,Web shop\n",
    );
    p.write(
        "data/dim_employee.csv",
        "employee_id,full_name\nE1,Eva Lang\n",
    );
    let tickets = format!(
        "ticket_id,customer_id,opened_at,closed_at,complaint,satisfaction,order_id\n\
         T1,C03,{} 09:00:00,{} 09:00:00,false,5,O31\n\
         T2,C03,{} 09:00:00,{} 09:00:00,false,2,O32\n\
         T3,C05,{} 09:00:00,{} 09:00:00,true,3,\n\
         T4,C05,{} 09:00:00,,true,,O51\n",
        day(300),
        day(299),
        day(30),
        day(29),
        day(100),
        day(98),
        day(10)
    );
    p.write("data/fact_service_ticket.csv", tickets);
    let invoices = format!(
        "invoice_id,customer_id,invoice_date,due_date,amount,first_paid_date,last_paid_date,days_late\n\
         I1,C04,{},{},300.00,,,\n\
         I2,C04,{},{},300.00,,,\n\
         I3,C04,{},{},300.00,,,\n\
         I4,C01,{},{},1000.00,{},{},-5\n\
         I5,C01,{},{},1000.00,{},{},-2\n\
         I6,C01,{},{},1000.00,{},{},7\n",
        day(200),
        day(170),
        day(150),
        day(120),
        day(100),
        day(70),
        day(81),
        day(51),
        day(56),
        day(56),
        day(61),
        day(31),
        day(33),
        day(33),
        day(41),
        day(11),
        day(4),
        day(4)
    );
    p.write("data/fact_invoice.csv", invoices);
    let interactions = format!(
        "interaction_id,customer_id,kind,occurred_at,responded,acted_on,answered\n\
         X1,C01,suggestion,{} 12:00:00,true,true,true\n\
         X2,C01,suggestion,{} 12:00:00,true,false,false\n\
         X3,C02,survey,{} 12:00:00,true,false,true\n",
        day(50),
        day(40),
        day(20)
    );
    p.write("data/fact_interaction.csv", interactions);
    p.write(
        "pipelines/star.yaml",
        r#"sources:
  sales:
    format: csv
    location: data/fact_sales.csv
    table: fact_sales
    schema:
      order_id: string
      line_no: int
      order_ts: timestamp
      customer_key: bigint
      customer_id: string
      product_id: string
      channel_id: string
      status: string
      net_amount: "decimal(14,2)"
      margin_amount: "decimal(14,2)"
  customers:
    format: csv
    location: data/dim_customer.csv
    table: dim_customer
    schema:
      customer_key: bigint
      customer_id: string
      customer_name: string
      segment: string
      region: string
      credit_limit: "decimal(14,2)"
      account_manager_id: string
      is_current: bool
      valid_from: timestamp
      valid_to: timestamp
  products: { format: csv, location: data/dim_product.csv, table: dim_product, schema: { product_id: string, category: string } }
  channels: { format: csv, location: data/dim_channel.csv, table: dim_channel, schema: { channel_id: string, channel_name: string } }
  employees: { format: csv, location: data/dim_employee.csv, table: dim_employee, schema: { employee_id: string, full_name: string } }
  tickets:
    format: csv
    location: data/fact_service_ticket.csv
    table: fact_service_ticket
    schema: { ticket_id: string, customer_id: string, opened_at: timestamp, closed_at: timestamp, complaint: bool, satisfaction: int, order_id: string }
  invoices:
    format: csv
    location: data/fact_invoice.csv
    table: fact_invoice
    schema:
      invoice_id: string
      customer_id: string
      invoice_date: date
      due_date: date
      amount: "decimal(14,2)"
      first_paid_date: date
      last_paid_date: date
      days_late: int
  interactions:
    format: csv
    location: data/fact_interaction.csv
    table: fact_interaction
    schema: { interaction_id: string, customer_id: string, kind: string, occurred_at: timestamp, responded: bool, acted_on: bool, answered: bool }
"#,
    );
    let cubes =
        std::fs::read_to_string(crate::support::repo().join("pipelines/cubes.yaml")).unwrap();
    // P(alive) from a dozen customers is no number to write out by hand: weigh it zero here.
    p.write(
        "pipelines/cubes.yaml",
        cubes.replace("w_alive: 0.75", "w_alive: 0.0"),
    );
    std::process::Command::new("cp")
        .args(["-r", "sql"])
        .arg(p.path())
        .current_dir(crate::support::repo())
        .status()
        .unwrap();
    p
}

fn by_customer(p: &Project, sql: &str) -> HashMap<String, Vec<String>> {
    p.query(sql)
        .into_iter()
        .map(|r| (r[0].clone(), r[1..].to_vec()))
        .collect()
}

#[test]
fn cubes_on_a_dozen_hand_made_customers() {
    let p = fixture();
    p.ok(&["run", "star"]);
    p.ok(&["cubes", "--as-of", AS_OF]);

    // RFM and tiers (see the table of orders above; quintiles by ntile over 12 customers).
    let loyalty = by_customer(
        &p,
        "select customer_id, recency_days, frequency, cast(monetary as bigint), tenure_days, r_score, f_score, m_score, tier \
         from cube_loyalty order by customer_id",
    );
    let expected = [
        ("C01", "5", "6", "6000", "394", "5", "5", "5", "champion"),
        ("C02", "10", "5", "4000", "300", "5", "4", "4", "champion"),
        ("C03", "20", "4", "8000", "500", "4", "3", "5", "potential"),
        ("C04", "30", "3", "900", "400", "3", "2", "2", "potential"),
        ("C05", "45", "2", "300", "200", "3", "1", "1", "potential"),
        ("C06", "60", "5", "2500", "600", "2", "4", "3", "at risk"),
        ("C07", "100", "4", "3000", "700", "2", "3", "3", "at risk"),
        (
            "C08",
            "150",
            "2",
            "500",
            "365",
            "2",
            "2",
            "2",
            "hibernating",
        ),
        ("C09", "200", "6", "4800", "420", "1", "5", "4", "at risk"),
        ("C10", "400", "3", "1500", "900", "1", "2", "2", "lost"),
        ("C11", "500", "1", "100", "500", "1", "1", "1", "lost"),
        ("C12", "15", "1", "200", "15", "4", "1", "1", "new"),
    ];
    for (c, rec, freq, mon, ten, r, f, m, tier) in expected {
        assert_eq!(loyalty[c], vec![rec, freq, mon, ten, r, f, m, tier], "{c}");
    }

    // The relationship structure: 31,800 in all; 5 of 12 customers bring 80%.
    let structure = by_customer(
        &p,
        "select tier, customers, cast(revenue as bigint), round(revenue_share, 4), round(customer_share_for_80pct, 4) \
         from cube_loyalty_structure",
    );
    assert_eq!(
        structure["champion"],
        vec!["2", "10000", "0.3145", "0.4167"]
    );
    assert_eq!(structure["at risk"], vec!["3", "10300", "0.3239", "0.4167"]);
    assert_eq!(
        structure["potential"],
        vec!["3", "9200", "0.2893", "0.4167"]
    );
    assert_eq!(structure["lost"], vec!["2", "1600", "0.0503", "0.4167"]);
    assert_eq!(structure["hibernating"][..2], ["1", "500"]);
    assert_eq!(structure["new"][..2], ["1", "200"]);
    let pareto = p.query(
        "select round(revenue_share, 4) from cube_loyalty_pareto where top_customers_pct = 25",
    );
    assert_eq!(
        pareto,
        vec![vec!["0.5912"]],
        "top 3 of 12 customers: 18,800 of 31,800"
    );

    // Churn warning, P(alive) weighed zero: each risk is the noisy-OR of the written-out signals.
    let churn = by_customer(
        &p,
        "select customer_id, round(risk_score, 4), warning_level, reasons from cube_churn_warning",
    );
    let expect = |c: &str, risk: &str, level: &str, reasons: &str| {
        assert_eq!(churn[c], vec![risk, level, reasons], "{c}");
    };
    expect(
        "C02",
        "0.1333",
        "green",
        "spend down 67% on the previous 90 days",
    );
    expect("C03", "0.3", "green", "satisfaction down from 5.0 to 2.0");
    expect("C04", "0.3", "green", "3 invoices over 30 days overdue");
    expect(
        "C05",
        "0.405",
        "amber",
        "2 complaints in 180 days; 1 unresolved tickets",
    );
    expect(
        "C07",
        "0.2",
        "green",
        "spend down 100% on the previous 90 days",
    );
    expect(
        "C09",
        "0.3818",
        "amber",
        "no purchase for 200 days, usually every 44",
    );
    expect("C01", "0.0", "green", "");
    assert_eq!(
        p.query("select distinct account_owner from cube_churn_warning"),
        vec![vec!["Eva Lang"]]
    );

    // Purchasing power: order value, 12-month spend, credit use and punctuality from the ERP.
    let power = by_customer(
        &p,
        "select customer_id, round(avg_order_value, 2), cast(spend_12m as bigint), round(credit_use, 4), \
         round(paid_on_time_share, 4) from cube_purchasing_power",
    );
    assert_eq!(power["C01"], vec!["1000.0", "5000", "0.0", "0.6667"]);
    assert_eq!(power["C04"], vec!["300.0", "600", "0.5", ""]);
    assert_eq!(power["C03"], vec!["2000.0", "6000", "0.0", ""]);
    let clv = by_customer(
        &p,
        "select customer_id, clv, p_alive, predicted_purchases from cube_purchasing_power",
    );
    let num = |c: &str, i: usize| clv[c][i].parse::<f64>().unwrap();
    assert!(
        num("C01", 0) > num("C11", 0),
        "a frequent recent buyer is worth more than a one-off"
    );
    for c in clv.keys() {
        assert!(
            (0.0..=1.0).contains(&num(c, 1)) && num(c, 2) >= 0.0,
            "{c}: {:?}",
            clv[c]
        );
    }

    // Knowledge sources: C01 gave two suggestions, one acted on; buys in two categories.
    let knowledge = by_customer(
        &p,
        "select customer_id, categories, suggestions, round(absorption, 2), knowledge_rank from cube_knowledge_source",
    );
    assert_eq!(knowledge["C01"], vec!["2", "2", "0.5", "1"]);
    assert_eq!(knowledge["C11"][..3], ["1", "0", "0.0"]);
    // Ticket detail: both of C03's tickets name an order and carry a rating; neither of C05's
    // does both (one has no order, the other no rating); C01 opened none.
    let detail = by_customer(
        &p,
        "select customer_id, tickets, ticket_detail from cube_knowledge_source",
    );
    assert_eq!(detail["C03"], vec!["2", "1.0"]);
    assert_eq!(detail["C05"], vec!["2", "0.0"]);
    assert_eq!(detail["C01"], vec!["0", "0.0"]);

    // Rollups: the grand total and one region.
    let rollup = p.query(
        "select grouping_level, region, cast(revenue as bigint), orders from cube_sales_rollup \
         where grouping_level in ('', 'region') order by grouping_level, region",
    );
    assert_eq!(rollup[0], vec!["", "", "31800", "42"]);
    assert_eq!(rollup[1], vec!["region", "North", "21700", "25"]);
    let churn_total =
        p.query("select customers, red, amber from cube_churn_rollup where grouping_level = ''");
    assert_eq!(churn_total.len(), 1);
    assert_eq!(churn_total[0][0], "12");

    // A second build as of the same date changes nothing; another date adds a snapshot.
    let before = p.ok(&["tables"]);
    p.ok(&["cubes", "--as-of", AS_OF]);
    assert_eq!(before, p.ok(&["tables"]));
    p.ok(&["cubes", "--as-of", "2025-05-31"]);
    assert_eq!(
        p.scalar("select count(distinct as_of) from cube_loyalty"),
        2
    );
}

#[test]
fn churn_warning_catches_planted_churners() {
    let p = Project::demo_with_own_data(0.1, 5);
    p.ok(&["run"]);
    let out = p.kbcrm(&["cubes", "evaluate", "--holdout", "90d"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report = stdout(&out);
    assert!(
        report.contains("churn_roc_auc") && report.contains("purchases_correlation"),
        "{report}"
    );
    assert_eq!(
        p.scalar("select count(*) from model_evaluation where metric = 'churn_roc_auc'"),
        1
    );
    // Score the warning as of the cut-off against the generator's truth.
    let truth = crate::star::truth_identity(&p.path().join("truth"));
    let cohort: HashMap<String, (String, String)> = {
        let mut r = csv::Reader::from_path(p.path().join("truth/customers.csv")).unwrap();
        r.deserialize::<HashMap<String, String>>()
            .map(|row| {
                let row = row.unwrap();
                (
                    row["true_customer_id"].clone(),
                    (row["churn_kind"].clone(), row["churned"].clone()),
                )
            })
            .collect()
    };
    let rows = p.query(
        "select w.risk_score, w.warning_level, m.source, m.source_id from cube_churn_warning w \
         join (select customer_id, min(source) as source, min(source_id) as source_id from map_customer_identity \
               where source = 'crm' group by customer_id) m on w.customer_id = m.customer_id \
         where w.as_of = (select max(as_of) from model_evaluation)",
    );
    let mut scored: Vec<(f64, bool, bool)> = Vec::new(); // (risk, planted churner, flagged)
    let mut stayers_flagged = (0, 0);
    for r in &rows {
        let t = &truth[&(r[2].clone(), r[3].clone())];
        let (kind, churned) = &cohort[t];
        let flagged = r[1] != "green";
        if kind == "planted" {
            scored.push((r[0].parse().unwrap(), true, flagged));
        } else if churned == "false" {
            scored.push((r[0].parse().unwrap(), false, flagged));
            stayers_flagged.0 += usize::from(flagged);
            stayers_flagged.1 += 1;
        }
    }
    let auc = roc_auc(&scored);
    let planted: Vec<_> = scored.iter().filter(|s| s.1).collect();
    let recall = planted.iter().filter(|s| s.2).count() as f64 / planted.len() as f64;
    let false_flags = stayers_flagged.0 as f64 / stayers_flagged.1 as f64;
    eprintln!(
        "planted churners {}: ROC AUC {auc:.4}, recall {recall:.4}, stayers flagged {false_flags:.4}",
        planted.len()
    );
    assert!(auc >= 0.85, "ROC AUC {auc}");
    assert!(recall >= 0.80, "red+amber recall {recall}");
    assert!(false_flags <= 0.20, "stayers flagged {false_flags}");
}

/// Mann-Whitney ROC AUC with average ranks for ties.
fn roc_auc(scored: &[(f64, bool, bool)]) -> f64 {
    let mut s: Vec<(f64, bool)> = scored.iter().map(|x| (x.0, x.1)).collect();
    s.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (mut i, mut pos_ranks) = (0, 0.0);
    while i < s.len() {
        let j = (i..s.len()).find(|&j| s[j].0 != s[i].0).unwrap_or(s.len());
        let avg = (i + 1 + j) as f64 / 2.0;
        pos_ranks += avg * s[i..j].iter().filter(|x| x.1).count() as f64;
        i = j;
    }
    let p = s.iter().filter(|x| x.1).count() as f64;
    let n = s.len() as f64 - p;
    (pos_ranks - p * (p + 1.0) / 2.0) / (p * n)
}

#[test]
fn evaluate_needs_a_built_star() {
    let p = Project::empty();
    let out = run_in(p.path(), &["cubes", "evaluate"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}
