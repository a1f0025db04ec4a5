-- Churn warning: P(alive) from BG/NBD, the time since the last purchase against the customer's
-- own rhythm, falling spend, complaints, unresolved tickets, falling satisfaction and overdue
-- invoices, combined into a risk score in [0, 1], a level and the top reasons in words.
with rfm as (
    select * from cube_customer_rfm where as_of = kbcrm_as_of()
),

params as (
    select * from model_params where as_of = kbcrm_as_of()
),

as_of as (
    select kbcrm_as_of() as d, cast(kbcrm_as_of() as int) as n
),

tickets as (
    select
        t.customer_id,
        count(case when t.complaint and cast(t.opened_at as date) > a.d - interval '180 days' then 1 end) as complaints_180d,
        count(case when t.complaint and (t.closed_at is null or cast(t.closed_at as date) > a.d) then 1 end) as open_complaints,
        count(case when t.closed_at is null or cast(t.closed_at as date) > a.d then 1 end) as unresolved_tickets,
        avg(case when cast(t.opened_at as date) > a.d - interval '180 days' then cast(t.satisfaction as double) end) as satisfaction_recent,
        avg(case when cast(t.opened_at as date) <= a.d - interval '180 days' then cast(t.satisfaction as double) end) as satisfaction_before
    from fact_service_ticket t
    cross join as_of a
    where cast(t.opened_at as date) <= a.d
    group by t.customer_id
),

invoices as (
    select
        v.customer_id,
        -- unpaid more than 30 days after their due date
        count(case when v.due_date < a.d - interval '30 days'
                    and (v.first_paid_date is null or v.first_paid_date > a.d) then 1 end) as overdue_invoices
    from fact_invoice v
    cross join as_of a
    where v.invoice_date <= a.d
    group by v.customer_id
),

owners as (
    select c.customer_id, c.account_manager_id, e.full_name as account_owner
    from dim_customer c
    left join dim_employee e on c.account_manager_id = e.employee_id
    where c.is_current
),

signals as (
    select
        r.customer_id,
        r.as_of,
        bgnbd_p_alive(r.frequency, r.recency_t, r.age_t, p.bg_r, p.bg_alpha, p.bg_a, p.bg_b) as p_alive,
        r.days_since_last,
        r.typical_gap_days,
        case when r.spend_prev_90d > 0
             then greatest(0.0, 1 - cast(r.spend_90d as double) / cast(r.spend_prev_90d as double)) end as spend_decline,
        r.spend_12m,
        coalesce(t.complaints_180d, 0) as complaints_180d,
        coalesce(t.open_complaints, 0) as open_complaints,
        coalesce(t.unresolved_tickets, 0) as unresolved_tickets,
        t.satisfaction_recent,
        t.satisfaction_before,
        coalesce(v.overdue_invoices, 0) as overdue_invoices
    from rfm r
    cross join params p
    left join tickets t on r.customer_id = t.customer_id
    left join invoices v on r.customer_id = v.customer_id
),

scores as (
    select
        *,
        1 - p_alive as s_alive,
        case when typical_gap_days > 0
             then least(1.0, greatest(0.0, (days_since_last / typical_gap_days - 2) / 4)) else 0.0 end as s_gap,
        coalesce(spend_decline, 0.0) as s_decline,
        least(1.0, complaints_180d / 3.0) as s_complaints,
        least(1.0, unresolved_tickets / 2.0) as s_unresolved,
        case when satisfaction_recent is not null and satisfaction_before is not null
             then least(1.0, greatest(0.0, (satisfaction_before - satisfaction_recent) / 2)) else 0.0 end as s_satisfaction,
        least(1.0, overdue_invoices / 3.0) as s_overdue
    from signals
),

weighted as (
    select
        *,
        -- noisy-OR: each signal alone can raise the risk up to its weight
        1 - (1 - cast(kbcrm_var('w_alive') as double) * s_alive)
          * (1 - cast(kbcrm_var('w_gap') as double) * s_gap)
          * (1 - cast(kbcrm_var('w_decline') as double) * s_decline)
          * (1 - cast(kbcrm_var('w_complaints') as double) * s_complaints)
          * (1 - cast(kbcrm_var('w_unresolved') as double) * s_unresolved)
          * (1 - cast(kbcrm_var('w_satisfaction') as double) * s_satisfaction)
          * (1 - cast(kbcrm_var('w_overdue') as double) * s_overdue) as risk_score
    from scores
),

final as (
    select
        w.customer_id,
        w.as_of,
        w.p_alive,
        w.days_since_last,
        w.typical_gap_days,
        w.spend_decline,
        w.complaints_180d,
        w.open_complaints,
        w.unresolved_tickets,
        w.satisfaction_recent,
        w.satisfaction_before,
        w.overdue_invoices,
        w.risk_score,
        case
            when w.risk_score >= cast(kbcrm_var('red_from') as double) then 'red'
            when w.risk_score >= cast(kbcrm_var('amber_from') as double) then 'amber'
            else 'green'
        end as warning_level,
        kbcrm_top_reasons(3, 0.15,
            w.s_gap, concat('no purchase for ', cast(w.days_since_last as varchar), ' days, usually every ',
                            cast(cast(round(w.typical_gap_days) as bigint) as varchar)),
            w.s_alive * 0.9, concat('only ', cast(cast(round(w.p_alive * 100) as bigint) as varchar), '% likely still active'),
            w.s_decline, concat('spend down ', cast(cast(round(w.s_decline * 100) as bigint) as varchar), '% on the previous 90 days'),
            w.s_complaints, concat(cast(w.complaints_180d as varchar), ' complaints in 180 days'),
            w.s_unresolved, concat(cast(w.unresolved_tickets as varchar), ' unresolved tickets'),
            w.s_satisfaction, concat('satisfaction down from ', cast(round(w.satisfaction_before, 1) as varchar),
                                     ' to ', cast(round(w.satisfaction_recent, 1) as varchar)),
            w.s_overdue, concat(cast(w.overdue_invoices as varchar), ' invoices over 30 days overdue')
        ) as reasons,
        w.spend_12m * w.risk_score as revenue_at_risk,
        o.account_manager_id,
        o.account_owner
    from weighted w
    left join owners o on w.customer_id = o.customer_id
)

select * from final
