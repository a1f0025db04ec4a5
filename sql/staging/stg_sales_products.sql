with source as (
    select * from raw_sales_products
),

final as (
    select
        product_id,
        sku,
        name as product_name,
        category,
        subcategory,
        brand,
        list_price,
        unit_cost,
        launched_on
    from source
)

select * from final
