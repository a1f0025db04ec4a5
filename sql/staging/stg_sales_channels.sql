select channel_id, name as channel_name, channel_type
from raw_sales_channels
