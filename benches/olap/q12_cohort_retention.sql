-- Cohorts by quarter of first purchase: customers still buying 1 to 4 quarters later.
with customer_quarters as (
    select distinct f.customer_id, d.year * 4 + d.quarter - 1 as q
    from fact_sales f
    join dim_date d on f.date_key = d.date_key
    where f.status = 'completed'
),
firsts as (
    select customer_id, min(q) as first_q from customer_quarters group by customer_id
)
select floor(fi.first_q / 4) as cohort_year, fi.first_q % 4 + 1 as cohort_quarter, cq.q - fi.first_q as quarters_later,
       count(*) as customers
from customer_quarters cq
join firsts fi on cq.customer_id = fi.customer_id
where cq.q - fi.first_q between 0 and 4
group by fi.first_q, cq.q - fi.first_q
order by fi.first_q, quarters_later
