-- What cube_knowledge_source scores, one row per customer as of the run's date: spend, breadth
-- of products bought, suggestions, feedback, surveys, campaign responses, ticket detail and the
-- share of suggestions absorbed. A table of its own, so that the cube can read it several times
-- (once per ranked column) without aggregating the facts again each time.
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
)

select * from joined
