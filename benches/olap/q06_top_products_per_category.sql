-- The three best-selling products of each category by revenue (a window function).
with per_product as (
    select p.category, p.product_name, f.product_id, sum(f.net_amount) as revenue
    from fact_sales f
    join dim_product p on f.product_id = p.product_id
    where f.status = 'completed'
    group by p.category, p.product_name, f.product_id
),
ranked as (
    select *, row_number() over (partition by category order by revenue desc, product_id) as rank_in_category
    from per_product
)
select category, rank_in_category, product_id, product_name, revenue
from ranked
where rank_in_category <= 3
order by category, rank_in_category
