with source as (
    select * from raw_sales_campaign_touches
),

final as (
    select
        touch_id,
        contact_id,
        campaign_id,
        sent_at,
        coalesce(opened, false) as opened,
        coalesce(clicked, false) as clicked,
        coalesce(responded, false) as responded
    from source
)

select * from final
