"""Structured output on the driver: grammars compiled off the step loop (`grammars.py`) and one matcher per
request that turns its output so far into the next step's token mask (`tracker.py`). The scheduler uses it
through `tandem.runtime.scheduling.constraint_hooks.ConstraintHooks`; the last stage applies the masks
(`tandem.runtime.sampling.token_mask`)."""
