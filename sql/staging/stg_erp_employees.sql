with source as (
    select * from raw_erp_employees
),

final as (
    select
        employee_id,
        trim(full_name) as full_name,
        role,
        region,
        lower(trim(email)) as email,
        hire_date
    from source
)

select * from final
