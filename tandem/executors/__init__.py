"""Executors run the scheduler's steps on the ranks: `local.LocalExecutor` in the caller's process (one
rank), `process.ProcessExecutor` on one process per rank (`rank.py` is their main loop), talking through the
typed, authenticated codec of `messages.py`."""
