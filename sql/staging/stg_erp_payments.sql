with source as (
    select * from raw_erp_payments
),

final as (
    select
        payment_id,
        invoice_id,
        erp_customer_id,
        paid_date,
        amount,
        method
    from source
)

select * from final
