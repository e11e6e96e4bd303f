"""The driver, pure Python (no torch): requests, admission, step planning, the prefix cache and the page / slot ids."""
