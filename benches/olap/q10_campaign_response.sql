-- Campaign touches per channel and month: open, click and response rates.
select d.year_month, i.channel, count(*) as touches,
       avg(case when i.opened then 1.0 else 0.0 end) as open_rate,
       avg(case when i.clicked then 1.0 else 0.0 end) as click_rate,
       avg(case when i.responded then 1.0 else 0.0 end) as response_rate
from fact_interaction i
join dim_date d on i.date_key = d.date_key
where i.kind = 'campaign_touch'
group by d.year_month, i.channel
order by d.year_month, i.channel
