-- Order lines with the customer version valid when the order was placed.
with lines as (
    select * from stg_sales_order_lines
),

orders as (
    select * from stg_sales_orders
),

identity as (
    select source_id, customer_id from map_customer_identity where source = 'crm'
),

customers as (
    select customer_key, customer_id, valid_from, valid_to from dim_customer
),

final as (
    select
        l.order_id,
        l.line_no,
        o.order_ts,
        cast(to_char(o.order_ts, '%Y%m%d') as int) as date_key,
        c.customer_key,
        i.customer_id,
        l.product_id,
        o.channel_id,
        o.sales_rep_id,
        o.status,
        l.quantity,
        l.unit_price,
        l.discount_pct,
        cast(l.quantity * l.unit_price as decimal(14, 2)) as gross_amount,
        l.discount_amount,
        l.net_amount,
        l.cost_amount,
        l.margin_amount
    from lines l
    join orders o on l.order_id = o.order_id
    join identity i on o.contact_id = i.source_id
    join customers c
      on c.customer_id = i.customer_id
     and o.order_ts >= c.valid_from
     and o.order_ts < c.valid_to
)

select * from final
