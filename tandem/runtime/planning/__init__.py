"""Layer partitions and capacity plans: per-layer costs from config.json, the timed decode probe, the partition resolver."""
