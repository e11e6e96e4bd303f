"""A stage's caches and their sizing: the paged KV pool, the linear-attention state pool, device memory and
the activation reserve."""
