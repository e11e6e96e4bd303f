"""Prometheus metrics of the server, in a registry of its own (several apps can live in one process).

Counters and histograms are updated as requests arrive, produce tokens and finish (token timings are
taken on the engine's loop thread, when the token exists). Gauges (queue lengths, cache use per stage)
and the engine's fault counters (rank failures, restarts) are refreshed from the engine when /metrics is
scraped. A request the engine ended with a message (a numeric failure, the engine giving up, shutdown)
finishes with reason "error"; one aborted because its client left, with "abort".

Cache use per stage: every stage holds the same pages and state slots (the driver hands them out once for
all stages), so page and slot use are the same on all stages; the bytes in use differ because each stage's
KV pool covers only its full-attention layers and its state pool only its linear-attention layers.

Engine counters (preemptions, prefix-cache queries and hits, speculative verify passes and drafts) are kept
by the engine's scheduler and exported as Prometheus counters by a collector that reads them at scrape time.
The same events also feed the series of SGLang's names (`sglang_metrics.py`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from tandem.server.sglang_metrics import SGLangMetrics

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0, 120.0, 300.0)


class Metrics:
    def __init__(self, model_name: str = "default"):
        self.registry = registry = CollectorRegistry()
        self.sglang = SGLangMetrics(registry, model_name, _LATENCY_BUCKETS)
        self.requests = Counter("tandem_requests", "Requests admitted to the engine.", ["endpoint"],
                                registry=registry)
        self.finished = Counter("tandem_requests_finished", "Requests finished, by finish reason.",
                                ["finish_reason"], registry=registry)
        self.invalid = Counter("tandem_invalid_requests", "Requests answered with a 4xx error.", ["endpoint"],
                               registry=registry)
        self.prompt_tokens = Counter("tandem_prompt_tokens", "Prompt tokens of admitted requests.",
                                     registry=registry)
        self.generation_tokens = Counter("tandem_generation_tokens", "Tokens generated.", registry=registry)
        self.ttft = Histogram("tandem_time_to_first_token_seconds", "Time from arrival to the first token.",
                              buckets=_LATENCY_BUCKETS, registry=registry)
        self.itl = Histogram("tandem_inter_token_latency_seconds", "Time between consecutive tokens of a request.",
                             buckets=_LATENCY_BUCKETS, registry=registry)
        self.e2e = Histogram("tandem_e2e_request_latency_seconds", "Time from arrival to the last token.",
                             buckets=_LATENCY_BUCKETS, registry=registry)
        self.running = Gauge("tandem_num_requests_running", "Requests holding KV pages and a state slot.",
                             registry=registry)
        self.waiting = Gauge("tandem_num_requests_waiting", "Requests queued (new, or preempted to resume).",
                             registry=registry)
        self.healthy = Gauge("tandem_engine_healthy", "1 while every rank is healthy, else 0.", registry=registry)
        self.rejected = Counter("tandem_rejected_requests", "Calls refused before reaching the engine, by reason "
                                "(queue_full, unauthorized, body_too_large).", ["reason"], registry=registry)
        self.rank_failures = Counter("tandem_rank_failures", "Failures of the ranks (a rank died or raised, or a "
                                     "restart failed).", registry=registry)
        self.restarts = Counter("tandem_engine_restarts", "Restarts of the ranks after a failure.",
                                registry=registry)
        self._faults_seen = {"rank_failures": 0, "restarts": 0}
        stage = ["pp_rank", "tp_rank"]
        self.slot_usage = Gauge("tandem_cache_slots_usage_ratio",
                                "Fraction of the stage's request state slots in use (one per running request).",
                                stage, registry=registry)
        self.kv_usage = Gauge("tandem_kv_cache_usage_ratio",
                              "Fraction of the stage's KV pages in use by requests and the prefix cache "
                              "(0 without KV layers).", stage, registry=registry)
        self.cache_bytes = Gauge("tandem_cache_bytes", "Cache bytes allocated on the stage.", stage + ["cache"],
                                 registry=registry)
        self.cache_used_bytes = Gauge("tandem_cache_used_bytes", "Cache bytes in use on the stage.",
                                      stage + ["cache"], registry=registry)
        self.stages: list[dict] = []
        self.engine_stats: dict = {}
        registry.register(_EngineCounters(self))

    # ---- request events (any thread) ---------------------------------------------------------------
    def request_started(self, tracked) -> None:
        self.requests.labels(tracked.endpoint).inc()
        self.prompt_tokens.inc(len(tracked.req.prompt_ids))
        self.sglang.prompt_tokens.inc(len(tracked.req.prompt_ids))

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)
        self.sglang.ttft.observe(seconds)

    def inter_token(self, seconds: float, count: int) -> None:
        """`count` tokens arrived `seconds` apart each."""
        for _ in range(count):
            self.itl.observe(seconds)
            self.sglang.itl.observe(seconds)

    def request_finished(self, tracked, now: float) -> None:
        req = tracked.req
        reason = req.finish_reason or {}
        self.finished.labels("error" if reason.get("message") else reason.get("type", "unknown")).inc()
        self.generation_tokens.inc(len(req.output_ids))
        self.e2e.observe(now - tracked.arrival)
        self.sglang.generation_tokens.inc(len(req.output_ids))
        self.sglang.e2e.observe(now - tracked.arrival)
        self.sglang.num_requests.inc()

    # ---- gauges (refreshed on scrape) --------------------------------------------------------------
    def set_stages(self, reports: list[dict]) -> None:
        """Remember each rank's static cache sizes (taken once, before the step loop starts)."""
        self.stages = [{k: r.get(k) for k in ("pp_rank", "tp_rank", "kv_cache_bytes", "state_cache_bytes")}
                       for r in reports]
        for s in self.stages:
            labels = (str(s["pp_rank"]), str(s["tp_rank"]))
            self.cache_bytes.labels(*labels, "kv").set(s["kv_cache_bytes"] or 0)
            self.cache_bytes.labels(*labels, "state").set(s["state_cache_bytes"] or 0)

    def refresh(self, engine, healthy: bool = True) -> None:
        stats = self.engine_stats = engine.cache_stats()
        self.sglang.refresh(stats)
        self.running.set(stats["running"])
        self.waiting.set(stats["waiting"])
        faults = engine.fault_stats()
        for name in ("rank_failures", "restarts"):  # the engine counts; the counters follow
            getattr(self, name).inc(max(0, faults[name] - self._faults_seen[name]))
            self._faults_seen[name] = max(faults[name], self._faults_seen[name])
        self.healthy.set(1 if healthy else 0)
        page_ratio = min(stats["used_pages"] / max(stats["num_pages"], 1), 1.0)
        slot_ratio = min(stats["running"] / max(stats["max_running_requests"], 1), 1.0)
        for s in self.stages:
            labels = (str(s["pp_rank"]), str(s["tp_rank"]))
            kv_bytes, state_bytes = s["kv_cache_bytes"] or 0, s["state_cache_bytes"] or 0
            self.slot_usage.labels(*labels).set(slot_ratio)
            self.kv_usage.labels(*labels).set(page_ratio if kv_bytes else 0.0)
            self.cache_used_bytes.labels(*labels, "kv").set(int(kv_bytes * page_ratio))
            self.cache_used_bytes.labels(*labels, "state").set(int(state_bytes * slot_ratio))

    def render(self, engine=None, healthy: bool = True) -> bytes:
        if engine is not None:
            self.refresh(engine, healthy)
        return generate_latest(self.registry)


class _EngineCounters:
    """The engine's own counters, read at scrape time (they live in the scheduler, not in this registry)."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self):
        stats = self.metrics.engine_stats
        counters = (
            ("tandem_preemptions", "Requests retracted because decode ran out of KV pages (they resume later).",
             "preemptions"),
            ("tandem_prefix_cache_queries", "Requests looked up in the radix prefix cache.", "prefix_cache_queries"),
            ("tandem_prefix_cache_query_tokens", "Prompt tokens of the requests looked up in the prefix cache.",
             "prefix_cache_query_tokens"),
            ("tandem_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache (not computed).",
             "prefix_cache_hit_tokens"),
            ("tandem_spec_verify_passes", "Speculative decoding: verify passes (a request's last token and its "
             "drafts through every stage).", "spec_verify_passes"),
            ("tandem_spec_proposed_drafts", "Speculative decoding: draft tokens sent to be verified.",
             "spec_proposed_drafts"),
            ("tandem_spec_accepted_drafts", "Speculative decoding: draft tokens the target accepted.",
             "spec_accepted_drafts"),
        )
        for name, documentation, key in counters:
            family = CounterMetricFamily(name, documentation)
            family.add_metric([], stats.get(key, 0))
            yield family
        rate = GaugeMetricFamily("tandem_prefix_cache_hit_rate", "Prefix-cache hit tokens over queried prompt tokens.")
        queried = stats.get("prefix_cache_query_tokens", 0)
        rate.add_metric([], stats.get("prefix_cache_hit_tokens", 0) / queried if queried else 0.0)
        yield rate
        pages = GaugeMetricFamily("tandem_prefix_cache_pages", "KV pages held by the radix prefix cache.")
        pages.add_metric([], stats.get("cached_pages", 0))
        yield pages
