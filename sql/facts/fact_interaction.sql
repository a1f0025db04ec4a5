-- Campaign touches and responses from sales, surveys and feedback from service, on one customer.
with touches as (
    select
        t.touch_id as interaction_id,
        'campaign_touch' as kind,
        t.sent_at as occurred_at,
        i.customer_id,
        t.campaign_id,
        cm.channel,
        t.opened,
        t.clicked,
        t.responded,
        cast(null as int) as score,
        false as acted_on,
        false as answered
    from stg_sales_campaign_touches t
    join map_customer_identity i on i.source = 'crm' and t.contact_id = i.source_id
    left join stg_sales_campaigns cm on t.campaign_id = cm.campaign_id
),

feedback as (
    select
        f.feedback_id as interaction_id,
        f.kind,
        f.submitted_at as occurred_at,
        i.customer_id,
        cast(null as varchar) as campaign_id,
        'service' as channel,
        false as opened,
        false as clicked,
        true as responded,
        f.score,
        f.acted_on,
        f.answered
    from stg_service_feedback f
    join map_customer_identity i on i.source = 'service' and f.service_customer_id = i.source_id
),

interactions as (
    select * from touches
    union all
    select * from feedback
),

final as (
    select
        x.interaction_id,
        x.kind,
        x.occurred_at,
        cast(to_char(x.occurred_at, '%Y%m%d') as int) as date_key,
        c.customer_key,
        x.customer_id,
        x.campaign_id,
        x.channel,
        x.opened,
        x.clicked,
        x.responded,
        x.score,
        x.acted_on,
        x.answered
    from interactions x
    join dim_customer c
      on c.customer_id = x.customer_id
     and x.occurred_at >= c.valid_from
     and x.occurred_at < c.valid_to
)

select * from final
