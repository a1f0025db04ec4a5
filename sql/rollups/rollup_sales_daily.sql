-- Sales per day and order status: revenue, margin and units by day, month, quarter or year.
select d.date_key, d.date_day, d.year, d.quarter, d.month, d.year_month, d.iso_week,
       d.day_of_week, d.is_weekend, f.status,
       sum(f.net_amount) as net_amount,
       sum(f.gross_amount) as gross_amount,
       sum(f.discount_amount) as discount_amount,
       sum(f.cost_amount) as cost_amount,
       sum(f.margin_amount) as margin_amount,
       sum(f.quantity) as quantity,
       count(*) as line_count
from fact_sales f
join dim_date d on f.date_key = d.date_key
group by d.date_key, d.date_day, d.year, d.quarter, d.month, d.year_month, d.iso_week,
         d.day_of_week, d.is_weekend, f.status
