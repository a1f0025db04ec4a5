-- Key customer knowledge sources: what a customer knows (value: spend, breadth of products,
-- suggestions), how willing they are to share it (feedback, surveys, campaign responses, and how
-- much detail their service tickets carry: an order reference and a satisfaction rating), and how
-- much of it the firm absorbs (share of their suggestions acted on or answered).
--
-- Each column's percent rank is computed over its distinct values: the share of the other
-- customers with a smaller value, (rank - 1) / (n - 1) as percent_rank() gives it. A window over
-- all customers would hold every row in memory at once, and six of them one after the other.
with n as (
    select count(*) as total from int_knowledge_inputs
),

counted as (
    select 'monetary' as col, cast(monetary as double) as v, count(*) as cnt from int_knowledge_inputs group by monetary
    union all
    select 'categories', cast(categories as double), count(*) from int_knowledge_inputs group by categories
    union all
    select 'suggestions', cast(suggestions as double), count(*) from int_knowledge_inputs group by suggestions
    union all
    select 'feedback', cast(feedback as double), count(*) from int_knowledge_inputs group by feedback
    union all
    select 'surveys', cast(surveys as double), count(*) from int_knowledge_inputs group by surveys
    union all
    select 'campaign_responses', cast(campaign_responses as double), count(*) from int_knowledge_inputs group by campaign_responses
),

ranks as (
    select
        col,
        v,
        case when total > 1
            then cast(sum(cnt) over (partition by col order by v rows between unbounded preceding and current row) - cnt as double) / (total - 1)
            else 0.0
        end as pr
    from counted cross join n
),

scored as (
    select
        i.*,
        (m.pr + c.pr + s.pr) / 3 as knowledge_value,
        (f.pr + sv.pr + cr.pr + i.ticket_detail) / 4 as willingness,
        coalesce(i.absorption_rate, 0.0) as absorption
    from int_knowledge_inputs i
    join ranks m on m.col = 'monetary' and m.v is not distinct from cast(i.monetary as double)
    join ranks c on c.col = 'categories' and c.v = cast(i.categories as double)
    join ranks s on s.col = 'suggestions' and s.v = cast(i.suggestions as double)
    join ranks f on f.col = 'feedback' and f.v = cast(i.feedback as double)
    join ranks sv on sv.col = 'surveys' and sv.v = cast(i.surveys as double)
    join ranks cr on cr.col = 'campaign_responses' and cr.v = cast(i.campaign_responses as double)
)

select
    customer_id,
    kbcrm_as_of() as as_of,
    monetary,
    categories,
    products,
    suggestions,
    surveys,
    feedback,
    campaign_responses,
    tickets,
    ticket_detail,
    knowledge_value,
    willingness,
    absorption,
    (knowledge_value + willingness + absorption) / 3 as knowledge_score,
    row_number() over (order by (knowledge_value + willingness + absorption) desc, customer_id) as knowledge_rank
from scored
