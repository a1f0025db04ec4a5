-- Customers and revenue per loyalty tier, across region and segment (CUBE), for BI.
with loyalty as (
    select l.*, c.region, c.segment
    from cube_loyalty l
    join dim_customer c on l.customer_id = c.customer_id and c.is_current
    where l.as_of = kbcrm_as_of()
)

select
    kbcrm_as_of() as as_of,
    case when grouping(tier) = 0 then tier end as tier,
    case when grouping(region) = 0 then region end as region,
    case when grouping(segment) = 0 then segment end as segment,
    concat_ws('+', case when grouping(tier) = 0 then 'tier' end,
                   case when grouping(region) = 0 then 'region' end,
                   case when grouping(segment) = 0 then 'segment' end) as grouping_level,
    count(*) as customers,
    sum(monetary) as revenue
from loyalty
group by cube (tier, region, segment)
