-- What each customer can and will buy: order value, spend trend, credit use and payment
-- punctuality from the ERP, and the BG/NBD + Gamma-Gamma predictions of purchases, spend and
-- customer lifetime value over the horizon.
with rfm as (
    select * from cube_customer_rfm where as_of = kbcrm_as_of()
),

params as (
    select * from model_params where as_of = kbcrm_as_of()
),

settings as (
    select
        cast(kbcrm_var('horizon_days') as double) as horizon_days,
        cast(kbcrm_var('time_unit_days') as double) as unit,
        cast(kbcrm_var('annual_discount_rate') as double) as annual_rate,
        cast(kbcrm_var('clv_periods') as double) as periods
),

customers as (
    select customer_id, credit_limit, segment, region
    from dim_customer
    where is_current
),

invoices as (
    select
        customer_id,
        sum(case when first_paid_date is null or first_paid_date > kbcrm_as_of() then amount else 0 end) as open_amount,
        count(case when last_paid_date <= kbcrm_as_of() then 1 end) as paid_invoices,
        count(case when last_paid_date <= kbcrm_as_of() and last_paid_date <= due_date then 1 end) as paid_on_time,
        avg(case when last_paid_date <= kbcrm_as_of() then cast(days_late as double) end) as avg_days_late
    from fact_invoice
    where invoice_date <= kbcrm_as_of()
    group by customer_id
),

predicted as (
    select
        r.customer_id,
        bgnbd_p_alive(r.frequency, r.recency_t, r.age_t, p.bg_r, p.bg_alpha, p.bg_a, p.bg_b) as p_alive,
        bgnbd_expected_purchases(r.frequency, r.recency_t, r.age_t, s.horizon_days / s.unit,
                                 p.bg_r, p.bg_alpha, p.bg_a, p.bg_b) as predicted_purchases,
        gg_expected_spend(r.frequency, coalesce(r.repeat_mean_spend, 0), p.gg_p, p.gg_q, p.gg_gamma) as expected_order_value,
        bgnbd_discounted_purchases(r.frequency, r.recency_t, r.age_t, s.horizon_days / s.unit, s.periods,
                                   power(1 + s.annual_rate, s.horizon_days / 365.0 / s.periods) - 1,
                                   p.bg_r, p.bg_alpha, p.bg_a, p.bg_b) as discounted_purchases,
        case when r.monetary > 0 then cast(r.margin as double) / cast(r.monetary as double) end as margin_rate
    from rfm r
    cross join params p
    cross join settings s
),

final as (
    select
        r.customer_id,
        r.as_of,
        c.segment,
        c.region,
        cast(r.monetary as double) / r.orders as avg_order_value,
        r.spend_12m,
        r.spend_prev_12m,
        case when r.spend_prev_12m > 0
             then cast(r.spend_12m - r.spend_prev_12m as double) / cast(r.spend_prev_12m as double) end as spend_trend,
        c.credit_limit,
        coalesce(i.open_amount, 0) as open_amount,
        case when c.credit_limit > 0 then cast(coalesce(i.open_amount, 0) as double) / cast(c.credit_limit as double) end as credit_use,
        case when i.paid_invoices > 0 then cast(i.paid_on_time as double) / i.paid_invoices end as paid_on_time_share,
        i.avg_days_late,
        p.p_alive,
        p.predicted_purchases,
        p.expected_order_value,
        p.predicted_purchases * p.expected_order_value as predicted_spend,
        p.discounted_purchases * p.expected_order_value * coalesce(p.margin_rate, 0) as clv
    from rfm r
    join predicted p on r.customer_id = p.customer_id
    left join customers c on r.customer_id = c.customer_id
    left join invoices i on r.customer_id = i.customer_id
),

banded as (
    select *, ntile(5) over (order by clv, customer_id) as clv_quintile from final
)

select
    *,
    case clv_quintile
        when 5 then 'very high' when 4 then 'high' when 3 then 'medium' when 2 then 'low' else 'very low'
    end as purchasing_power_band
from banded
