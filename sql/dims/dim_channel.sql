select channel_id, channel_name, channel_type
from stg_sales_channels
