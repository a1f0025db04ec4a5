with source as (
    select * from raw_service_customers
),

cleaned as (
    select
        service_customer_id,
        trim(name) as name,
        nullif(trim(company), '') as company,
        nullif(lower(trim(email)), '') as email,
        regexp_replace(phone, '[^0-9+]', '', 'g') as phone_digits,
        created_at
    from source
),

final as (
    select
        service_customer_id,
        name,
        company,
        email,
        case
            when phone_digits like '+%' then phone_digits
            when phone_digits like '00%' then '+' || substr(phone_digits, 3)
            when phone_digits like '0%' then '+49' || substr(phone_digits, 2)
            else nullif(phone_digits, '')
        end as phone,
        created_at
    from cleaned
)

select * from final
