-- ERP invoices with what was paid, when, and the customer's credit limit at the time.
with invoices as (
    select * from stg_erp_invoices
),

payments as (
    select
        invoice_id,
        min(paid_date) as first_paid_date,
        max(paid_date) as last_paid_date,
        sum(amount) as paid_amount,
        count(*) as payment_count
    from stg_erp_payments
    group by invoice_id
),

identity as (
    select source_id, customer_id from map_customer_identity where source = 'erp'
),

customers as (
    select customer_key, customer_id, credit_limit, valid_from, valid_to from dim_customer
),

final as (
    select
        v.invoice_id,
        v.order_id,
        c.customer_key,
        i.customer_id,
        v.invoice_date,
        cast(to_char(v.invoice_date, '%Y%m%d') as int) as date_key,
        v.due_date,
        v.amount,
        v.currency,
        coalesce(p.paid_amount, 0) as paid_amount,
        p.first_paid_date,
        p.last_paid_date,
        coalesce(p.paid_amount, 0) >= v.amount as is_paid,
        case when coalesce(p.paid_amount, 0) >= v.amount
             then cast(p.last_paid_date - v.due_date as int) end as days_late,
        c.credit_limit
    from invoices v
    join identity i on v.erp_customer_id = i.source_id
    join customers c
      on c.customer_id = i.customer_id
     and cast(v.invoice_date as timestamp) >= c.valid_from
     and cast(v.invoice_date as timestamp) < c.valid_to
    left join payments p on v.invoice_id = p.invoice_id
)

select * from final
