-- Service tickets per region and category: complaints, satisfaction, resolution time.
select c.region, t.category, count(*) as tickets,
       sum(case when t.complaint then 1 else 0 end) as complaints,
       avg(t.satisfaction) as satisfaction, avg(t.resolution_hours) as resolution_hours
from fact_service_ticket t
join dim_customer c on t.customer_key = c.customer_key
group by c.region, t.category
order by c.region, t.category
