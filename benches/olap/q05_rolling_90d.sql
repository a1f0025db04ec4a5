-- Rolling 90-day revenue for each day of the last quarter of 2025.
with daily as (
    select d.date_day, sum(f.net_amount) as revenue
    from fact_sales f
    join dim_date d on f.date_key = d.date_key
    where f.status = 'completed' and d.date_day between date '2025-07-01' and date '2025-12-31'
    group by d.date_day
),
rolling as (
    select date_day, revenue,
           sum(revenue) over (order by date_day rows between 89 preceding and current row) as revenue_90d
    from daily
)
select date_day, revenue, revenue_90d
from rolling
where date_day >= date '2025-10-01'
order by date_day
