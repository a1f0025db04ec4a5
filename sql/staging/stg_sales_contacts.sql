-- CRM contacts: one person per row, identities normalised for matching.
with source as (
    select * from raw_sales_contacts
),

cleaned as (
    select
        contact_id,
        trim(first_name) as first_name,
        trim(last_name) as last_name,
        nullif(trim(company), '') as company,
        nullif(lower(trim(email)), '') as email,
        regexp_replace(phone, '[^0-9+]', '', 'g') as phone_digits,
        trim(postcode) as postcode,
        trim(city) as city,
        upper(trim(country)) as country,
        owner_id,
        created_at,
        updated_at
    from source
),

final as (
    select
        contact_id,
        first_name,
        last_name,
        concat_ws(' ', first_name, last_name) as full_name,
        company,
        email,
        case
            when phone_digits like '+%' then phone_digits
            when phone_digits like '00%' then '+' || substr(phone_digits, 3)
            when phone_digits like '0%' then '+49' || substr(phone_digits, 2)
            else nullif(phone_digits, '')
        end as phone,
        postcode,
        city,
        country,
        owner_id,
        created_at,
        updated_at
    from cleaned
)

select * from final
