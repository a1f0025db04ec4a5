-- ERP customer master: trimmed text, normalised tax id, e-mail and phone (E.164).
with source as (
    select * from raw_erp_customers
),

cleaned as (
    select
        erp_customer_id,
        trim(legal_name) as legal_name,
        nullif(upper(regexp_replace(tax_id, '[^A-Za-z0-9]', '', 'g')), '') as tax_id,
        nullif(lower(trim(email)), '') as email,
        regexp_replace(phone, '[^0-9+]', '', 'g') as phone_digits,
        trim(street) as street,
        trim(postcode) as postcode,
        trim(city) as city,
        upper(trim(country)) as country,
        region,
        segment,
        credit_limit,
        payment_terms_days,
        created_at,
        updated_at
    from source
),

final as (
    select
        erp_customer_id,
        legal_name,
        tax_id,
        email,
        case
            when phone_digits like '+%' then phone_digits
            when phone_digits like '00%' then '+' || substr(phone_digits, 3)
            when phone_digits like '0%' then '+49' || substr(phone_digits, 2)
            else nullif(phone_digits, '')
        end as phone,
        street,
        postcode,
        city,
        country,
        region,
        segment,
        credit_limit,
        payment_terms_days,
        created_at,
        updated_at
    from cleaned
)

select * from final
