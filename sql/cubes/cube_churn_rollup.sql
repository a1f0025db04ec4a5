-- Revenue at risk and warning counts by region and segment (ROLLUP), for BI.
with warnings as (
    select w.*, c.region, c.segment
    from cube_churn_warning w
    join dim_customer c on w.customer_id = c.customer_id and c.is_current
    where w.as_of = kbcrm_as_of()
)

select
    kbcrm_as_of() as as_of,
    case when grouping(region) = 0 then region end as region,
    case when grouping(segment) = 0 then segment end as segment,
    concat_ws('+', case when grouping(region) = 0 then 'region' end,
                   case when grouping(segment) = 0 then 'segment' end) as grouping_level,
    count(*) as customers,
    count(case when warning_level = 'red' then 1 end) as red,
    count(case when warning_level = 'amber' then 1 end) as amber,
    -- Rounded: floating-point sums depend on the order rows arrive in, and a re-run must
    -- not see a change in the last bits as new data.
    round(sum(revenue_at_risk), 2) as revenue_at_risk,
    round(avg(risk_score), 6) as avg_risk
from warnings
group by rollup (region, segment)
