-- The Pareto curve: the share of revenue brought by the top 1%, 2%, ... 100% of customers.
with ranked as (
    select
        revenue_share,
        cast(revenue_rank as double) / count(*) over () as customer_share
    from cube_loyalty
    where as_of = kbcrm_as_of()
),

percentiles as (
    select cast(value as int) as pct from generate_series(1, 100)
),

final as (
    select
        kbcrm_as_of() as as_of,
        p.pct as top_customers_pct,
        sum(r.revenue_share) as revenue_share
    from percentiles p
    join ranked r on r.customer_share <= p.pct / 100.0
    group by p.pct
)

select * from final
