"""One rank's runtime: batches, caches, sampling, the model runner, and the rank process loop."""
