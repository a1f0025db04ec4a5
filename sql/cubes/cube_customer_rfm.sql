-- Each customer's purchase history summarised as of the run's as-of date: the inputs of the
-- loyalty, purchasing-power and churn cubes and of the BG/NBD and Gamma-Gamma models.
-- Days with a purchase count as one transaction (as in the BG/NBD papers).
with orders as (
    select
        customer_id,
        order_id,
        min(order_ts) as order_ts,
        sum(net_amount) as amount,
        sum(margin_amount) as margin
    from fact_sales
    where status = 'completed'
      and cast(order_ts as date) <= kbcrm_as_of()
    group by customer_id, order_id
),

days as (
    select
        customer_id,
        cast(order_ts as date) as day,
        cast(cast(order_ts as date) as int) as day_n,
        sum(amount) as amount,
        sum(margin) as margin,
        count(*) as orders
    from orders
    group by customer_id, cast(order_ts as date)
),

ranked as (
    select *, row_number() over (partition by customer_id order by day) as n from days
),

params as (
    select
        cast(kbcrm_as_of() as int) as as_of_n,
        cast(kbcrm_var('time_unit_days') as double) as unit
),

per_customer as (
    select
        r.customer_id,
        min(r.day) as first_purchase,
        max(r.day) as last_purchase,
        min(r.day_n) as first_n,
        max(r.day_n) as last_n,
        count(*) as purchase_days,
        sum(r.orders) as orders,
        sum(r.amount) as monetary,
        sum(r.margin) as margin,
        avg(case when r.n > 1 then cast(r.amount as double) end) as repeat_mean_spend,
        sum(case when r.day_n > p.as_of_n - 365 then r.amount else 0 end) as spend_12m,
        sum(case when r.day_n > p.as_of_n - 730 and r.day_n <= p.as_of_n - 365 then r.amount else 0 end) as spend_prev_12m,
        sum(case when r.day_n > p.as_of_n - 90 then r.amount else 0 end) as spend_90d,
        sum(case when r.day_n > p.as_of_n - 180 and r.day_n <= p.as_of_n - 90 then r.amount else 0 end) as spend_prev_90d
    from ranked r
    cross join params p
    group by r.customer_id
),

final as (
    select
        c.customer_id,
        kbcrm_as_of() as as_of,
        c.first_purchase,
        c.last_purchase,
        c.purchase_days - 1 as frequency,
        cast(c.last_n - c.first_n as double) / p.unit as recency_t,
        cast(p.as_of_n - c.first_n as double) / p.unit as age_t,
        p.as_of_n - c.last_n as days_since_last,
        p.as_of_n - c.first_n as tenure_days,
        case when c.purchase_days > 1
             then cast(c.last_n - c.first_n as double) / (c.purchase_days - 1) end as typical_gap_days,
        c.orders,
        c.monetary,
        c.margin,
        c.repeat_mean_spend,
        c.spend_12m,
        c.spend_prev_12m,
        c.spend_90d,
        c.spend_prev_90d
    from per_customer c
    cross join params p
)

select * from final
