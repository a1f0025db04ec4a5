select campaign_id, name as campaign_name, channel, sent_on
from raw_sales_campaigns
