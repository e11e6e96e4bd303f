"""Model families, built from the shared blocks in `common.py`; `registry` maps architecture names to them."""
