-- ERP payments with the invoice they settle and the customer version valid on the payment date.
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

-- Each payment with its invoice first: in an incremental run the few new payments are hashed
-- and the invoices stream past them.
settled as (
    select p.*, v.due_date
    from payments p
    left join invoices v on p.invoice_id = v.invoice_id
),

final as (
    select
        s.payment_id,
        s.invoice_id,
        c.customer_key,
        i.customer_id,
        s.paid_date,
        cast(to_char(s.paid_date, '%Y%m%d') as int) as date_key,
        s.amount,
        s.method,
        s.due_date,
        cast(s.paid_date - s.due_date as int) as days_after_due
    from settled s
    join identity i on s.erp_customer_id = i.source_id
    join customers c
      on c.customer_id = i.customer_id
     and cast(s.paid_date as timestamp) >= c.valid_from
     and cast(s.paid_date as timestamp) < c.valid_to
)

select * from final
