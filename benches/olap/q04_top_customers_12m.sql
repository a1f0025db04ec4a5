-- The 20 customers with the most revenue in the last twelve months, with their current name.
select f.customer_id, c.customer_name, c.region, sum(f.net_amount) as revenue,
       count(distinct f.order_id) as orders
from fact_sales f
join dim_customer c on f.customer_id = c.customer_id and c.is_current
where f.order_ts >= timestamp '2025-01-01 00:00:00+00' and f.status = 'completed'
group by f.customer_id, c.customer_name, c.region
order by revenue desc, f.customer_id
limit 20
