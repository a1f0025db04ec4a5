-- One customer's full history: every sale, invoice, payment, ticket and interaction in time order.
select 'sale' as kind, cast(order_ts as date) as day, order_id as ref, net_amount as amount
from fact_sales where customer_id = :customer_id
union all
select 'invoice', invoice_date, invoice_id, amount
from fact_invoice where customer_id = :customer_id
union all
select 'payment', paid_date, payment_id, amount
from fact_payment where customer_id = :customer_id
union all
select 'ticket', cast(opened_at as date), ticket_id, null
from fact_service_ticket where customer_id = :customer_id
union all
select 'interaction', cast(occurred_at as date), interaction_id, null
from fact_interaction where customer_id = :customer_id
order by day, kind, ref
