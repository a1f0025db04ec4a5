-- Margin rate by customer segment and product category for enterprise and mid-market.
select c.segment, p.category, sum(f.margin_amount) as margin, sum(f.net_amount) as revenue,
       cast(sum(f.margin_amount) as double) / cast(sum(f.net_amount) as double) as margin_rate
from fact_sales f
join dim_customer c on f.customer_key = c.customer_key
join dim_product p on f.product_id = p.product_id
where c.segment in ('enterprise', 'mid-market') and f.status = 'completed'
group by c.segment, p.category
order by c.segment, p.category
