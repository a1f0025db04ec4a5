with source as (
    select * from raw_sales_orders
),

final as (
    select
        order_id,
        contact_id,
        order_ts,
        cast(order_ts as date) as order_date,
        channel_id,
        nullif(sales_rep_id, '') as sales_rep_id,
        lower(status) as status,
        upper(currency) as currency
    from source
)

select * from final
