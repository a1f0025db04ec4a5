-- Revenue, orders and customers rolled up for BI over region, segment, channel, product
-- category and month; `grouping_level` names the dimensions of each row.
with sales as (
    select
        c.region,
        c.segment,
        ch.channel_name as channel,
        p.category,
        to_char(f.order_ts, '%Y-%m') as month,
        f.order_id,
        f.customer_id,
        f.net_amount,
        f.margin_amount
    from fact_sales f
    join dim_customer c on f.customer_key = c.customer_key
    join dim_product p on f.product_id = p.product_id
    join dim_channel ch on f.channel_id = ch.channel_id
    where f.status = 'completed'
)

select
    case when grouping(region) = 0 then region end as region,
    case when grouping(segment) = 0 then segment end as segment,
    case when grouping(channel) = 0 then channel end as channel,
    case when grouping(category) = 0 then category end as category,
    case when grouping(month) = 0 then month end as month,
    concat_ws('+',
        case when grouping(region) = 0 then 'region' end,
        case when grouping(segment) = 0 then 'segment' end,
        case when grouping(channel) = 0 then 'channel' end,
        case when grouping(category) = 0 then 'category' end,
        case when grouping(month) = 0 then 'month' end) as grouping_level,
    sum(net_amount) as revenue,
    sum(margin_amount) as margin,
    count(distinct order_id) as orders,
    count(distinct customer_id) as customers
from sales
group by grouping sets (
    (), (region), (segment), (channel), (category), (month),
    (region, month), (segment, month), (channel, month), (category, month),
    (region, segment), (region, category)
)
