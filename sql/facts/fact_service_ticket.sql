with tickets as (
    select * from stg_service_tickets
),

identity as (
    select source_id, customer_id from map_customer_identity where source = 'service'
),

customers as (
    select customer_key, customer_id, valid_from, valid_to from dim_customer
),

final as (
    select
        t.ticket_id,
        c.customer_key,
        i.customer_id,
        t.opened_at,
        cast(to_char(t.opened_at, '%Y%m%d') as int) as date_key,
        t.closed_at,
        t.is_open,
        t.category,
        t.severity,
        t.complaint,
        t.satisfaction,
        t.resolution_hours,
        t.agent_id,
        t.channel,
        t.order_id
    from tickets t
    join identity i on t.service_customer_id = i.source_id
    join customers c
      on c.customer_id = i.customer_id
     and t.opened_at >= c.valid_from
     and t.opened_at < c.valid_to
)

select * from final
