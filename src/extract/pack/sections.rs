//! The pack's fixed sections: the tables each reads and the query over the cubes that fills it.

/// One section: (name, title, tables read, query).
pub(super) type Section = (&'static str, &'static str, Vec<&'static str>, String);

/// The sections as of `d` (a SQL date literal), with customer lists cut at `top` rows.
pub(super) fn sections(d: &str, top: usize) -> Vec<Section> {
    [churn(d), loyalty(d), purchasing(d, top), knowledge(d, top)]
        .into_iter()
        .flatten()
        .collect()
}

/// Churn warnings: the red and amber customers, and revenue at risk by region.
fn churn(d: &str) -> Vec<Section> {
    vec![
        (
            "churn_warnings",
            "Churn warnings: red and amber customers by revenue at risk",
            vec!["cube_churn_warning", "dim_customer"],
            format!(
                "select w.customer_id, c.customer_name, c.region, c.segment, w.warning_level, \
                 w.risk_score, w.revenue_at_risk, w.reasons, w.account_owner, \
                 w.days_since_last, w.p_alive \
                 from cube_churn_warning w \
                 left join dim_customer c on c.customer_id = w.customer_id and c.is_current \
                 where w.as_of = {d} and w.warning_level in ('red', 'amber') \
                 order by w.revenue_at_risk desc nulls last, w.customer_id"
            ),
        ),
        (
            "risk_by_region",
            "Revenue at risk by region",
            vec!["cube_churn_warning", "dim_customer"],
            format!(
                "select coalesce(c.region, 'unknown') as region, count(*) as customers, \
                 sum(case when w.warning_level = 'red' then 1 else 0 end) as red, \
                 sum(case when w.warning_level = 'amber' then 1 else 0 end) as amber, \
                 sum(w.revenue_at_risk) as revenue_at_risk \
                 from cube_churn_warning w \
                 left join dim_customer c on c.customer_id = w.customer_id and c.is_current \
                 where w.as_of = {d} group by 1 order by revenue_at_risk desc, region"
            ),
        ),
    ]
}

/// Loyalty: the tiers and the Pareto curve.
fn loyalty(d: &str) -> Vec<Section> {
    vec![
        (
            "loyalty_tiers",
            "Loyalty tiers: the customer relationship structure",
            vec!["cube_loyalty"],
            format!(
                "with l as (select * from cube_loyalty where as_of = {d}), \
                 t as (select count(*) as n, sum(cast(monetary as double)) as m from l) \
                 select tier, count(*) as customers, \
                 cast(count(*) as double) / max(t.n) as customer_share, \
                 sum(cast(l.monetary as double)) as revenue, \
                 sum(cast(l.monetary as double)) / max(t.m) as revenue_share, \
                 avg(cast(frequency as double)) as avg_orders, \
                 avg(cast(recency_days as double)) as avg_recency_days \
                 from l cross join t group by tier \
                 order by case tier when 'champion' then 1 when 'loyal' then 2 \
                 when 'potential' then 3 when 'new' then 4 when 'at risk' then 5 \
                 when 'hibernating' then 6 when 'lost' then 7 else 8 end, tier"
            ),
        ),
        (
            "pareto",
            "Pareto curve: share of revenue from the top customers",
            vec!["cube_loyalty"],
            format!(
                "with r as (select cast(monetary as double) as m, \
                 row_number() over (order by monetary desc, customer_id) as rn, \
                 count(*) over () as n from cube_loyalty where as_of = {d}), \
                 c as (select rn, n, sum(m) over (order by rn rows between unbounded preceding \
                 and current row) as cum, sum(m) over () as total from r) \
                 select cast(ceil(rn * 100.0 / n) as bigint) as top_customers_pct, \
                 max(cum) / max(total) as revenue_share \
                 from c group by 1 order by 1"
            ),
        ),
    ]
}

/// Purchasing power: the bands, the lifetime value ranges and the top customers by it.
fn purchasing(d: &str, top: usize) -> Vec<Section> {
    vec![
        (
            "purchasing_power_bands",
            "Purchasing power bands",
            vec!["cube_purchasing_power"],
            format!(
                "select purchasing_power_band, count(*) as customers, \
                 avg(cast(avg_order_value as double)) as avg_order_value, \
                 sum(cast(spend_12m as double)) as spend_12m, \
                 sum(predicted_spend) as predicted_spend_12m, sum(clv) as clv, \
                 avg(p_alive) as p_alive \
                 from cube_purchasing_power where as_of = {d} \
                 group by 1 order by case purchasing_power_band when 'very high' then 1 \
                 when 'high' then 2 when 'medium' then 3 when 'low' then 4 \
                 when 'very low' then 5 else 6 end, 1"
            ),
        ),
        (
            "clv_distribution",
            "Customer lifetime value: how many customers in each range",
            vec!["cube_purchasing_power"],
            format!(
                "with bins(bin, lo, hi, clv_range) as (values \
                 (1, -1e300, 50.0, 'under 50'), (2, 50.0, 100.0, '50-100'), \
                 (3, 100.0, 250.0, '100-250'), (4, 250.0, 500.0, '250-500'), \
                 (5, 500.0, 1000.0, '500-1k'), (6, 1000.0, 2500.0, '1k-2.5k'), \
                 (7, 2500.0, 5000.0, '2.5k-5k'), (8, 5000.0, 1e300, '5k+')), \
                 p as (select clv from cube_purchasing_power where as_of = {d} and clv is not null) \
                 select b.clv_range, count(p.clv) as customers, \
                 coalesce(sum(p.clv), 0.0) as clv \
                 from bins b left join p on p.clv >= b.lo and p.clv < b.hi \
                 group by b.bin, b.clv_range order by b.bin"
            ),
        ),
        (
            "top_clv",
            "Top customers by predicted lifetime value",
            vec!["cube_purchasing_power", "dim_customer"],
            format!(
                "select p.customer_id, c.customer_name, p.region, p.segment, \
                 p.purchasing_power_band, p.predicted_purchases, p.predicted_spend, p.clv, \
                 p.p_alive, p.spend_12m \
                 from cube_purchasing_power p \
                 left join dim_customer c on c.customer_id = p.customer_id and c.is_current \
                 where p.as_of = {d} order by p.clv desc nulls last, p.customer_id limit {top}"
            ),
        ),
    ]
}

/// The key customer knowledge sources.
fn knowledge(d: &str, top: usize) -> Vec<Section> {
    vec![(
        "knowledge_sources",
        "Key customer knowledge sources",
        vec!["cube_knowledge_source", "dim_customer"],
        format!(
            "select k.knowledge_rank, k.customer_id, c.customer_name, k.knowledge_score, \
                 k.knowledge_value, k.willingness, k.absorption, k.suggestions, k.surveys, \
                 k.feedback, k.campaign_responses \
                 from cube_knowledge_source k \
                 left join dim_customer c on c.customer_id = k.customer_id and c.is_current \
                 where k.as_of = {d} order by k.knowledge_rank, k.customer_id limit {top}"
        ),
    )]
}
