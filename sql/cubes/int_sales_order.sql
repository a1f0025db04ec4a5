-- Completed sales at one row per order, with its customer version (region, segment), channel and
-- month: what cube_sales_rollup counts orders by for the groupings without product category.
with order_categories as (
    select * from int_sales_order_category
),

final as (
    select
        order_id,
        region,
        segment,
        channel,
        month,
        customer_id,
        sum(revenue) as revenue,
        sum(margin) as margin
    from order_categories
    group by order_id, region, segment, channel, month, customer_id
)

select * from final
