with source as (
    select * from raw_service_feedback
),

final as (
    select
        feedback_id,
        service_customer_id,
        kind,
        submitted_at,
        score,
        text,
        coalesce(acted_on, false) as acted_on,
        coalesce(answered, false) as answered
    from source
)

select * from final
