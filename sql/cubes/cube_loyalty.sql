-- Recency, frequency, monetary value and tenure, their quintile scores, and a loyalty tier.
-- Thresholds are pipeline variables (pipelines/cubes.yaml).
with rfm as (
    select * from cube_customer_rfm where as_of = kbcrm_as_of()
),

scored as (
    select
        *,
        ntile(5) over (order by days_since_last desc, customer_id) as r_score,
        ntile(5) over (order by orders, customer_id) as f_score,
        ntile(5) over (order by monetary, customer_id) as m_score
    from rfm
),

tiered as (
    select
        *,
        case
            when days_since_last > cast(kbcrm_var('lost_after_days') as int) then 'lost'
            when tenure_days <= cast(kbcrm_var('new_within_days') as int) then 'new'
            when r_score >= 4 and f_score >= 4 and m_score >= 4 then 'champion'
            when r_score >= 3 and f_score >= 4 then 'loyal'
            when r_score >= 4 then 'potential'
            when r_score <= 2 and f_score >= 3 then 'at risk'
            when r_score <= 2 then 'hibernating'
            else 'potential'
        end as tier
    from scored
),

final as (
    select
        customer_id,
        as_of,
        days_since_last as recency_days,
        orders as frequency,
        monetary,
        tenure_days,
        case when orders > 0 then cast(orders - 1 as double) / orders end as repeat_purchase_rate,
        r_score,
        f_score,
        m_score,
        concat(cast(r_score as varchar), cast(f_score as varchar), cast(m_score as varchar)) as rfm_cell,
        tier,
        cast(monetary as double) / sum(cast(monetary as double)) over () as revenue_share,
        row_number() over (order by monetary desc, customer_id) as revenue_rank
    from tiered
)

select * from final
