-- Revenue by region and segment in 2024, the customer as they were at each sale (SCD2 key).
select c.region, c.segment, sum(f.net_amount) as revenue, count(distinct f.customer_id) as customers
from fact_sales f
join dim_date d on f.date_key = d.date_key
join dim_customer c on f.customer_key = c.customer_key
where d.year = 2024 and f.status = 'completed'
group by c.region, c.segment
order by c.region, c.segment
