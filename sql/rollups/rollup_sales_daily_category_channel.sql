-- Sales per day, product category and channel: the same measures by category and channel.
select d.date_key, d.date_day, d.year, d.quarter, d.month, d.year_month,
       p.category, ch.channel_id, ch.channel_name, ch.channel_type, f.status,
       sum(f.net_amount) as net_amount,
       sum(f.gross_amount) as gross_amount,
       sum(f.discount_amount) as discount_amount,
       sum(f.cost_amount) as cost_amount,
       sum(f.margin_amount) as margin_amount,
       sum(f.quantity) as quantity,
       count(*) as line_count
from fact_sales f
join dim_date d on f.date_key = d.date_key
join dim_product p on f.product_id = p.product_id
join dim_channel ch on f.channel_id = ch.channel_id
group by d.date_key, d.date_day, d.year, d.quarter, d.month, d.year_month,
         p.category, ch.channel_id, ch.channel_name, ch.channel_type, f.status
