with payments as (
    select * from stg_erp_payments
),

invoices as (
    select invoice_id, due_date, amount as invoice_amount from stg_erp_invoices
),

identity as (
    select source_id, customer_id from map_customer_identity where source = 'erp'
),

customers as (
    select customer_key, customer_id, valid_from, valid_to from dim_customer
),

final as (
    select
        p.payment_id,
        p.invoice_id,
        c.customer_key,
        i.customer_id,
        p.paid_date,
        cast(to_char(p.paid_date, '%Y%m%d') as int) as date_key,
        p.amount,
        p.method,
        v.due_date,
        cast(p.paid_date - v.due_date as int) as days_after_due
    from payments p
    join identity i on p.erp_customer_id = i.source_id
    join customers c
      on c.customer_id = i.customer_id
     and cast(p.paid_date as timestamp) >= c.valid_from
     and cast(p.paid_date as timestamp) < c.valid_to
    left join invoices v on p.invoice_id = v.invoice_id
)

select * from final
