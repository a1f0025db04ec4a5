-- BG/NBD and Gamma-Gamma fitted by maximum likelihood on the customers' histories as of the
-- as-of date (time unit: kbcrm_var('time_unit_days') days).
with bg as (
    select bgnbd_fit(frequency, recency_t, age_t) as f from cube_customer_rfm where as_of = kbcrm_as_of()
),

gg as (
    select gg_fit(frequency, repeat_mean_spend) as f
    from cube_customer_rfm
    where as_of = kbcrm_as_of() and frequency > 0 and repeat_mean_spend > 0
)

select
    kbcrm_as_of() as as_of,
    cast(kbcrm_var('time_unit_days') as double) as time_unit_days,
    bg.f['r'] as bg_r,
    bg.f['alpha'] as bg_alpha,
    bg.f['a'] as bg_a,
    bg.f['b'] as bg_b,
    bg.f['log_likelihood'] as bg_log_likelihood,
    cast(bg.f['customers'] as bigint) as bg_customers,
    gg.f['p'] as gg_p,
    gg.f['q'] as gg_q,
    gg.f['gamma'] as gg_gamma,
    gg.f['log_likelihood'] as gg_log_likelihood,
    cast(gg.f['customers'] as bigint) as gg_customers
from bg
cross join gg
