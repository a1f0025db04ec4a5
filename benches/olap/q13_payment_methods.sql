-- Payments per method and year: amount and how many days after the due date they came.
select d.year, p.method, count(*) as payments, sum(p.amount) as paid,
       avg(p.days_after_due) as avg_days_after_due
from fact_payment p
join dim_date d on p.date_key = d.date_key
group by d.year, p.method
order by d.year, p.method
