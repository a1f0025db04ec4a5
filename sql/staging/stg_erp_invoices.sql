with source as (
    select * from raw_erp_invoices
),

final as (
    select
        invoice_id,
        erp_customer_id,
        order_ref as order_id,
        invoice_date,
        due_date,
        amount,
        upper(currency) as currency
    from source
)

select * from final
