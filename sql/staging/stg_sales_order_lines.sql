with lines as (
    select * from raw_sales_order_lines
),

products as (
    select product_id, unit_cost from raw_sales_products
),

final as (
    select
        l.order_id,
        l.line_no,
        l.product_id,
        l.quantity,
        l.unit_price,
        l.discount_pct,
        l.net_amount,
        cast(l.quantity * l.unit_price - l.net_amount as decimal(14, 2)) as discount_amount,
        cast(l.quantity * p.unit_cost as decimal(14, 2)) as cost_amount,
        cast(l.net_amount - l.quantity * p.unit_cost as decimal(14, 2)) as margin_amount
    from lines l
    left join products p on l.product_id = p.product_id
)

select * from final
