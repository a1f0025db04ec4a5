-- Invoices per region and quarter: amount invoiced, share paid late, average days late.
select c.region, d.year, d.quarter, count(*) as invoices, sum(v.amount) as invoiced,
       avg(case when v.days_late > 0 then 1.0 else 0.0 end) as late_share,
       avg(v.days_late) as avg_days_late
from fact_invoice v
join dim_customer c on v.customer_key = c.customer_key
join dim_date d on v.date_key = d.date_key
group by c.region, d.year, d.quarter
order by c.region, d.year, d.quarter
