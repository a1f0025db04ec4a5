-- Online revenue of three categories per quarter: filters on two dimensions.
select d.year, d.quarter, p.category, sum(f.net_amount) as revenue, sum(f.quantity) as units
from fact_sales f
join dim_channel ch on f.channel_id = ch.channel_id
join dim_product p on f.product_id = p.product_id
join dim_date d on f.date_key = d.date_key
where ch.channel_type = 'online'
  and p.category in ('Electronics', 'Software', 'Furniture')
  and f.status = 'completed'
group by d.year, d.quarter, p.category
order by d.year, d.quarter, p.category
