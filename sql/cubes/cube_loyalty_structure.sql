-- The relationship structure: customers and revenue per tier, and how few customers bring 80%
-- of the revenue.
with loyalty as (
    select * from cube_loyalty where as_of = kbcrm_as_of()
),

pareto as (
    select
        customer_id,
        sum(revenue_share) over (order by revenue_rank rows between unbounded preceding and current row) as cumulative_share,
        revenue_rank,
        count(*) over () as customers
    from loyalty
),

eighty as (
    select cast(min(revenue_rank) as double) / max(customers) as customer_share_for_80pct
    from pareto
    where cumulative_share >= 0.8
),

tiers as (
    select
        tier,
        count(*) as customers,
        sum(monetary) as revenue,
        avg(cast(frequency as double)) as avg_orders,
        avg(cast(recency_days as double)) as avg_recency_days
    from loyalty
    group by tier
),

final as (
    select
        kbcrm_as_of() as as_of,
        t.tier,
        case t.tier
            when 'champion' then 1 when 'loyal' then 2 when 'potential' then 3 when 'new' then 4
            when 'at risk' then 5 when 'hibernating' then 6 else 7
        end as tier_order,
        t.customers,
        cast(t.customers as double) / sum(t.customers) over () as customer_share,
        t.revenue,
        cast(t.revenue as double) / sum(cast(t.revenue as double)) over () as revenue_share,
        t.avg_orders,
        t.avg_recency_days,
        e.customer_share_for_80pct
    from tiers t
    cross join eighty e
)

select * from final
