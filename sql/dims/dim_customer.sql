-- One row per resolved customer; the scd2 load mode keeps every version with its validity.
with golden as (
    select * from int_customer_golden
),

regions as (
    select city, region from dim_region
),

final as (
    select
        g.customer_id,
        coalesce(g.name, g.company) as customer_name,
        g.company,
        coalesce(g.segment, case when g.company is null then 'consumer' else 'small business' end) as segment,
        coalesce(g.region, r.region) as region,
        g.city,
        g.postcode,
        g.street,
        g.email,
        g.phone,
        g.tax_id,
        g.credit_limit,
        g.payment_terms_days,
        g.account_manager_id,
        g.sources,
        g.record_count,
        coalesce(g.updated_at, arrow_cast('1900-01-01T00:00:00Z', 'Timestamp(Microsecond, Some("UTC"))')) as updated_at
    from golden g
    left join regions r on g.city = r.city
)

select * from final
