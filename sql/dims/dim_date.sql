-- One row per calendar day.
with days as (
    select cast(value as date) as date_day
    from generate_series(timestamp '2020-01-01 00:00:00', timestamp '2027-12-31 00:00:00', interval '1 day')
),

final as (
    select
        cast(to_char(date_day, '%Y%m%d') as int) as date_key,
        date_day,
        cast(extract(year from date_day) as int) as year,
        cast(extract(quarter from date_day) as int) as quarter,
        cast(extract(month from date_day) as int) as month,
        to_char(date_day, '%Y-%m') as year_month,
        cast(extract(week from date_day) as int) as iso_week,
        cast(extract(isodow from date_day) as int) as day_of_week,
        extract(isodow from date_day) >= 6 as is_weekend
    from days
)

select * from final
