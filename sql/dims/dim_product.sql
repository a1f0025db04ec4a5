select
    product_id,
    sku,
    product_name,
    category,
    subcategory,
    brand,
    list_price,
    unit_cost,
    launched_on
from stg_sales_products
