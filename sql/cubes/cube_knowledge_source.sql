-- Key customer knowledge sources: what a customer knows (value: spend, breadth of products,
-- suggestions), how willing they are to share it (feedback, surveys, campaign responses, and how
-- much detail their service tickets carry: an order reference and a satisfaction rating), and how
-- much of it the firm absorbs (share of their suggestions acted on or answered).
with rfm as (
    select customer_id, monetary from cube_customer_rfm where as_of = kbcrm_as_of()
),

-- distinct products and categories by grouping three times (per-group distinct sets over
-- millions of lines are several times slower and take gigabytes)
bought as (
    select f.customer_id, p.category, f.product_id
    from fact_sales f
    join dim_product p on f.product_id = p.product_id
    where cast(f.order_ts as date) <= kbcrm_as_of()
    group by f.customer_id, p.category, f.product_id
),

per_category as (
    select customer_id, category, count(*) as products from bought group by customer_id, category
),

breadth as (
    select customer_id, count(*) as categories, sum(products) as products
    from per_category
    group by customer_id
),

interactions as (
    select
        customer_id,
        count(case when kind = 'suggestion' then 1 end) as suggestions,
        count(case when kind = 'survey' then 1 end) as surveys,
        count(case when kind in ('suggestion', 'praise', 'survey') then 1 end) as feedback,
        count(case when kind = 'campaign_touch' and responded then 1 end) as campaign_responses,
        count(case when kind = 'suggestion' and (acted_on or answered) then 1 end) as suggestions_absorbed
    from fact_interaction
    where cast(occurred_at as date) <= kbcrm_as_of()
    group by customer_id
),

tickets as (
    select
        customer_id,
        count(*) as tickets,
        avg(case when order_id is not null and satisfaction is not null then 1.0 else 0.0 end) as ticket_detail
    from fact_service_ticket
    where cast(opened_at as date) <= kbcrm_as_of()
    group by customer_id
),

joined as (
    select
        r.customer_id,
        r.monetary,
        coalesce(b.categories, 0) as categories,
        coalesce(b.products, 0) as products,
        coalesce(i.suggestions, 0) as suggestions,
        coalesce(i.surveys, 0) as surveys,
        coalesce(i.feedback, 0) as feedback,
        coalesce(i.campaign_responses, 0) as campaign_responses,
        coalesce(t.tickets, 0) as tickets,
        coalesce(t.ticket_detail, 0.0) as ticket_detail,
        case when i.suggestions > 0 then cast(i.suggestions_absorbed as double) / i.suggestions end as absorption_rate
    from rfm r
    left join breadth b on r.customer_id = b.customer_id
    left join interactions i on r.customer_id = i.customer_id
    left join tickets t on r.customer_id = t.customer_id
),

scored as (
    select
        *,
        (percent_rank() over (order by monetary) + percent_rank() over (order by categories)
          + percent_rank() over (order by suggestions)) / 3 as knowledge_value,
        (percent_rank() over (order by feedback) + percent_rank() over (order by surveys)
          + percent_rank() over (order by campaign_responses) + ticket_detail) / 4 as willingness,
        coalesce(absorption_rate, 0.0) as absorption
    from joined
)

select
    customer_id,
    kbcrm_as_of() as as_of,
    monetary,
    categories,
    products,
    suggestions,
    surveys,
    feedback,
    campaign_responses,
    tickets,
    ticket_detail,
    knowledge_value,
    willingness,
    absorption,
    (knowledge_value + willingness + absorption) / 3 as knowledge_score,
    row_number() over (order by (knowledge_value + willingness + absorption) desc, customer_id) as knowledge_rank
from scored
