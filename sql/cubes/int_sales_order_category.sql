-- Completed sales at one row per order and product category, with the order's customer version
-- (region, segment), channel and month: what cube_sales_rollup counts orders and customers from
-- by grouping, without per-group distinct sets (slow, and beyond the memory limit at scale).
select
    f.order_id,
    p.category,
    c.region,
    c.segment,
    ch.channel_name as channel,
    to_char(f.order_ts, '%Y-%m') as month,
    f.customer_id,
    sum(f.net_amount) as revenue,
    sum(f.margin_amount) as margin
from fact_sales f
join dim_customer c on f.customer_key = c.customer_key
join dim_product p on f.product_id = p.product_id
join dim_channel ch on f.channel_id = ch.channel_id
where f.status = 'completed'
group by f.order_id, p.category, c.region, c.segment, ch.channel_name, to_char(f.order_ts, '%Y-%m'), f.customer_id
