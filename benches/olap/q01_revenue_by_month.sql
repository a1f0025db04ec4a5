-- Revenue, margin and orders per calendar month (fact joined to the date dimension).
select d.year, d.month, sum(f.net_amount) as revenue, sum(f.margin_amount) as margin,
       count(distinct f.order_id) as orders
from fact_sales f
join dim_date d on f.date_key = d.date_key
where f.status = 'completed'
group by d.year, d.month
order by d.year, d.month
