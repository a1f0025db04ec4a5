-- Regions and the cities in them, as the ERP knows them.
select distinct city, region
from stg_erp_customers
where city is not null and region is not null
