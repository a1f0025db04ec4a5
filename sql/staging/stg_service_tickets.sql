with source as (
    select * from raw_service_tickets
),

final as (
    select
        ticket_id,
        service_customer_id,
        opened_at,
        closed_at,
        closed_at is null as is_open,
        category,
        severity,
        coalesce(complaint, false) as complaint,
        satisfaction,
        resolution_hours,
        agent_id,
        channel,
        nullif(order_ref, '') as order_id
    from source
)

select * from final
