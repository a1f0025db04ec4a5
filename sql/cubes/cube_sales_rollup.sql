-- Revenue, orders and customers rolled up for BI over region, segment, channel, product
-- category and month; `grouping_level` names the dimensions of each row. Orders and customers
-- are counted as the rows of groupings that include them (an order has one customer version,
-- channel and month; its lines may span categories).
with orders as (
    select order_id, region, segment, channel, month, sum(revenue) as revenue, sum(margin) as margin
    from int_sales_order_category
    group by order_id, region, segment, channel, month
),

by_order as (
    select
        region, segment, channel, cast(null as varchar) as category, month,
        concat_ws('+',
            case when grouping(region) = 0 then 'region' end,
            case when grouping(segment) = 0 then 'segment' end,
            case when grouping(channel) = 0 then 'channel' end,
            case when grouping(month) = 0 then 'month' end) as grouping_level,
        sum(revenue) as revenue,
        sum(margin) as margin,
        count(*) as orders
    from orders
    group by grouping sets (
        (), (region), (segment), (channel), (month),
        (region, month), (segment, month), (channel, month), (region, segment)
    )
),

by_category as (
    select
        region, cast(null as varchar) as segment, cast(null as varchar) as channel, category, month,
        concat_ws('+',
            case when grouping(region) = 0 then 'region' end,
            'category',
            case when grouping(month) = 0 then 'month' end) as grouping_level,
        sum(revenue) as revenue,
        sum(margin) as margin,
        count(*) as orders
    from int_sales_order_category
    group by grouping sets ((category), (category, month), (region, category))
),

-- one row per grouping and customer
customer_sets as (
    select
        region, segment, channel, category, month,
        concat_ws('+',
            case when grouping(region) = 0 then 'region' end,
            case when grouping(segment) = 0 then 'segment' end,
            case when grouping(channel) = 0 then 'channel' end,
            case when grouping(category) = 0 then 'category' end,
            case when grouping(month) = 0 then 'month' end) as grouping_level
    from int_sales_order_category
    group by grouping sets (
        (customer_id), (region, customer_id), (segment, customer_id), (channel, customer_id),
        (category, customer_id), (month, customer_id), (region, month, customer_id),
        (segment, month, customer_id), (channel, month, customer_id),
        (category, month, customer_id), (region, segment, customer_id),
        (region, category, customer_id)
    )
),

customers as (
    select grouping_level, region, segment, channel, category, month, count(*) as customers
    from customer_sets
    group by grouping_level, region, segment, channel, category, month
),

measures as (
    select * from by_order
    union all
    select * from by_category
)

select
    m.region,
    m.segment,
    m.channel,
    m.category,
    m.month,
    m.grouping_level,
    cast(m.revenue as decimal(24, 2)) as revenue,
    cast(m.margin as decimal(24, 2)) as margin,
    m.orders,
    c.customers
from measures m
join customers c
  on m.grouping_level = c.grouping_level
 and (m.region is not distinct from c.region)
 and (m.segment is not distinct from c.segment)
 and (m.channel is not distinct from c.channel)
 and (m.category is not distinct from c.category)
 and (m.month is not distinct from c.month)
