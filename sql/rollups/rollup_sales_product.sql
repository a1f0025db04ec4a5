-- Sales per product and order status over the whole history.
select f.product_id, p.product_name, p.sku, p.category, p.subcategory, p.brand, f.status,
       sum(f.net_amount) as net_amount,
       sum(f.gross_amount) as gross_amount,
       sum(f.discount_amount) as discount_amount,
       sum(f.cost_amount) as cost_amount,
       sum(f.margin_amount) as margin_amount,
       sum(f.quantity) as quantity,
       count(*) as line_count,
       min(f.order_ts) as first_sold_at,
       max(f.order_ts) as last_sold_at
from fact_sales f
join dim_product p on f.product_id = p.product_id
group by f.product_id, p.product_name, p.sku, p.category, p.subcategory, p.brand, f.status
