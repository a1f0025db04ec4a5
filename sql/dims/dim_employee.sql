select employee_id, full_name, role, region, email, hire_date
from stg_erp_employees
