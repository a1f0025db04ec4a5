-- Sales reps by revenue in 2025, with their distinct customers and average discount.
select e.employee_id, e.full_name, e.region, sum(f.net_amount) as revenue,
       count(distinct f.customer_id) as customers, avg(f.discount_pct) as avg_discount_pct
from fact_sales f
join dim_employee e on f.sales_rep_id = e.employee_id
join dim_date d on f.date_key = d.date_key
where d.year = 2025 and f.status = 'completed'
group by e.employee_id, e.full_name, e.region
order by revenue desc, e.employee_id
