"""Prometheus metrics for ``GET /metrics``: one registry per runtime, never the global one.

Three sources, so nothing is counted twice or drifts:

- requests and jobs: the HTTP layer reports each request once it ended
  (:meth:`Metrics.observe_request`) and each job's replies as they arrive
  (:class:`JobWatch`, hung on the job's ticket);
- model lifecycle: the runtime's :class:`EventLog`, whose free-text reasons are mapped
  to a small fixed set (:func:`unload_reason`, :func:`evict_reason`, :func:`kill_reason`);
- devices and models now: read from ``Runtime.snapshot()`` at scrape time, the same
  dump ``/admin/state`` shows.

Label values are bounded: configured model names, route templates, key *names* and
status codes; anything else becomes ``""``. No request id, raw path or user string.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase

from llmux.actors.events import Event, EventLog
from llmux.actors.messages import Failure, Finished, Piece, Reply, Started
from llmux.actors.model_actor import State
from llmux.config import Config

Snapshot = Callable[[], Mapping[str, Any]]

# Request latencies: from a cached token (milliseconds) to a cold load behind a queue.
LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                          30.0, 60.0, 120.0, 300.0, 600.0)
LOAD_BUCKETS: Final = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
                       600.0)

UNLOAD_REASONS: Final = ("idle", "evicted", "admin", "moved", "crash", "killed", "other")
EVICT_REASONS: Final = ("make_room", "exclusive_group")
KILL_REASONS: Final = ("ignored_cancel", "ignored_unload", "other")
CUT_REASONS: Final = ("shutdown",)  # llmux.shutdown.cut_reason
STATES: Final = tuple(state.value for state in State)
LOADED: Final = frozenset({State.READY.value, State.BUSY.value, State.DRAINING.value})
# A transition out of these (other than to loading) ends a load: loading -> ready or
# failed, or unloaded/failed -> failed when its files are missing and it never began.
LOAD_OUTCOMES: Final = frozenset({State.LOADING.value, State.UNLOADED.value,
                                  State.FAILED.value})
NO_KEY: Final = "none"


# --- pure decisions ------------------------------------------------------------------------


def bounded(value: str | None, allowed: Collection[str], default: str = "") -> str:
    """``value`` if it is one of ``allowed``, else ``default``: a label never carries
    a string a client made up."""
    return value if value is not None and value in allowed else default


def unload_reason(text: str) -> str:
    """The fixed reason of an unload, from a transition's free text (model_actor)."""
    if text.startswith("evicted "):  # placement.plan's sentences
        return "evicted"
    if text.startswith("idle for"):
        return "idle"
    if text.startswith("unloaded by an admin"):
        return "admin"
    if text.startswith("moving to"):
        return "moved"
    if text.startswith("worker died"):
        return "crash"
    return "other"


def evict_reason(text: str) -> str:
    """Why the arbiter evicted: for room, or to leave an exclusive group."""
    return "exclusive_group" if "exclusive group" in text else "make_room"


def kill_reason(text: str) -> str:
    """Why a worker was signalled instead of leaving by itself."""
    if "ignored cancel" in text:
        return "ignored_cancel"
    if "ignored unload" in text:
        return "ignored_unload"
    return "other"


# --- one job's replies -----------------------------------------------------------------


def token_count(value: object) -> int:
    """A usage count as reported; 0 for anything that is not a positive int."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return 0


class JobWatch:
    """Sees a job's replies as its ticket hands them out: queue wait at ``Started``,
    time to first token (or first audio bytes) at the first ``Piece``, tokens at
    ``Finished``. Times run from the watch's creation, right after the submit."""

    def __init__(self, metrics: Metrics, route: str, model: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._metrics = metrics
        self._labels = (route, model)
        self._model = model
        self._clock = clock
        self._since = clock()
        # The same facts for the request log, so the log and the metrics always agree.
        self.queue_wait_s: float | None = None
        self.first_token_s: float | None = None
        self.tokens_in: int | None = None  # None until the job finished
        self.tokens_out: int | None = None
        self.error: str | None = None  # the failure's code (or type), if it failed

    def __call__(self, reply: Reply | None) -> None:
        match reply:
            case Started() if self.queue_wait_s is None:
                self.queue_wait_s = self._elapsed()
                self._metrics.child(self._metrics.queue_wait, *self._labels).observe(
                    self.queue_wait_s)
            case Piece() if self.first_token_s is None:
                self.first_token_s = self._elapsed()
                self._metrics.child(self._metrics.first_token, *self._labels).observe(
                    self.first_token_s)
            case Finished(data=data):
                usage = data.get("usage") or {}
                self.tokens_in = token_count(usage.get("prompt_tokens"))
                self.tokens_out = token_count(usage.get("completion_tokens"))
                self._count(self._metrics.tokens_in, self.tokens_in)
                self._count(self._metrics.tokens_out, self.tokens_out)
            case Failure(error=error):
                self.error = error.code or error.type

    def _elapsed(self) -> float:
        return max(0.0, self._clock() - self._since)

    def _count(self, counter: Counter, tokens: int) -> None:
        if tokens > 0:
            self._metrics.child(counter, self._model).inc(tokens)


# --- devices and models, read at scrape time -------------------------------------------


class RuntimeCollector:
    """Gauges from ``snapshot()`` on each scrape: no bookkeeping of its own to drift.
    Runs on the event loop (the scrape handler calls it), like every reader of actors."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        state = self._snapshot()
        device = ["device"]
        capacity = GaugeMetricFamily("llmux_device_capacity_bytes", "Memory the arbiter may "
                                     "place models in (budget or total, minus margin and "
                                     "foreign use).", labels=device)
        used = GaugeMetricFamily("llmux_device_used_bytes", "Footprints of loaded models.",
                                 labels=device)
        reserved = GaugeMetricFamily("llmux_device_reserved_bytes", "Memory held for models "
                                     "loading, or released but not yet seen free.",
                                     labels=device)
        free = GaugeMetricFamily("llmux_device_free_bytes", "Capacity minus used and "
                                 "reserved.", labels=device)
        for dev in state["devices"]:
            capacity.add_metric([dev["id"]], dev["capacity_bytes"])
            used.add_metric([dev["id"]], dev["used_bytes"])
            reserved.add_metric([dev["id"]], dev["reserved_bytes"])
            free.add_metric([dev["id"]], dev["free_bytes"])
        model = ["model"]
        states = GaugeMetricFamily("llmux_model_state", "1 for the state each physical model "
                                   "is in, 0 for the others.", labels=["model", "state"])
        loaded = GaugeMetricFamily("llmux_model_loaded", "1 while the model's worker is "
                                   "loaded (ready, busy or draining).", labels=model)
        queue = GaugeMetricFamily("llmux_model_queue_depth", "Requests waiting for the "
                                  "model.", labels=model)
        in_flight = GaugeMetricFamily("llmux_model_in_flight", "Requests the model is "
                                      "serving now.", labels=model)
        footprint = GaugeMetricFamily("llmux_model_footprint_bytes", "The model's footprint "
                                      "on its device: measured once loaded, else estimated.",
                                      labels=["model", "device"])
        for entry in state["models"]:
            name = entry["id"]
            for value in STATES:
                states.add_metric([name, value], 1.0 if entry["state"] == value else 0.0)
            loaded.add_metric([name], 1.0 if entry["state"] in LOADED else 0.0)
            queue.add_metric([name], entry["queue_depth"])
            in_flight.add_metric([name], entry["in_flight"])
            footprint.add_metric([name, entry["device"]], entry["footprint_bytes"])
        return [capacity, used, reserved, free, states, loaded, queue, in_flight, footprint]


# --- the registry ------------------------------------------------------------------------


class Metrics:
    """Every llmux metric, in a registry of its own (two runtimes in one process, as in
    tests, never share counters)."""

    def __init__(self, config: Config, events: EventLog, snapshot: Snapshot) -> None:
        self.registry = CollectorRegistry()
        self.virtual_models = frozenset(config.virtual_models)
        self.physical_models = frozenset(config.physical_models)
        self.physical_of = {name: v.physical for name, v in config.virtual_models.items()}
        self._loading_since: dict[str, float] = {}
        self._children: dict[tuple[MetricWrapperBase, tuple[str, ...]], Any] = {}
        self._killed: set[str] = set()  # models whose worker we signalled: not a crash
        r = self.registry
        self.requests = Counter(
            "llmux_requests", "HTTP requests by route template, virtual model, status and "
            "API key name (status 499: the client left before the response ended).",
            ["route", "model", "status", "key"], registry=r)
        self.requests_cut = Counter(
            "llmux_requests_cut", "HTTP requests the server cut before their response's "
            "end, by route template, virtual model, status sent and reason (shutdown: the "
            "drain's grace period ran out); llmux_requests counts them too, with that "
            "status.", ["route", "model", "status", "reason"], registry=r)
        self.request_duration = Histogram(
            "llmux_request_duration_seconds", "From the request's arrival to the last byte "
            "of its response (streams included).", ["route", "model"],
            buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram(
            "llmux_queue_wait_seconds", "From a job's submit until its model started it "
            "(includes a load).", ["route", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.first_token = Histogram(
            "llmux_time_to_first_token_seconds", "From a job's submit to its first token "
            "(speech: its first audio bytes).", ["route", "model"],
            buckets=LATENCY_BUCKETS, registry=r)
        self.tokens_in = Counter("llmux_input_tokens", "Prompt tokens of finished jobs.",
                                 ["model"], registry=r)
        self.tokens_out = Counter("llmux_output_tokens", "Generated tokens of finished jobs.",
                                  ["model"], registry=r)
        self.loads = Counter("llmux_model_loads", "Model loads by result (loaded, failed).",
                             ["model", "result"], registry=r)
        self.load_duration = Histogram(
            "llmux_model_load_duration_seconds", "From the arbiter's grant to ready (spawn, "
            "load, warm-up).", ["model"], buckets=LOAD_BUCKETS, registry=r)
        self.unloads = Counter("llmux_model_unloads", "Models leaving memory, by reason: "
                               + ", ".join(UNLOAD_REASONS) + ".", ["model", "reason"],
                               registry=r)
        self.evictions = Counter("llmux_model_evictions", "Evictions by the arbiter, by "
                                 "reason: " + ", ".join(EVICT_REASONS) + ".",
                                 ["model", "reason"], registry=r)
        self.refusals = Counter("llmux_model_load_refusals", "Loads refused at once (can "
                                "never fit).", ["model"], registry=r)
        self.crashes = Counter("llmux_worker_crashes", "Loaded workers that died on their "
                               "own.", ["model"], registry=r)
        self.kills = Counter("llmux_worker_kills", "Workers signalled because they ignored "
                             "a cancel or an unload.", ["model", "reason"], registry=r)
        self.unverified = Counter("llmux_release_unverified", "Unloads whose memory the "
                                  "device did not show free in time.", ["model"], registry=r)
        self.registry.register(RuntimeCollector(snapshot))
        events.subscribe(self.on_event)

    # -- HTTP ------------------------------------------------------------------------------

    def child(self, metric: MetricWrapperBase, *values: str) -> Any:
        """``metric.labels(*values)``, kept for the next time: prometheus_client checks
        the values and looks them up under a lock on every call, which cost more than
        the count itself, and each request counts six. Label values are bounded (see
        above), so this holds no more children than the registry does."""
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def model_label(self, name: str | None) -> str:
        return bounded(name, self.virtual_models)

    def observe_request(self, *, route: str, model: str | None, status: int, key: str,
                        seconds: float, cut: str | None = None) -> None:
        """One ended request; ``route`` must be a route template, ``key`` a key name,
        ``cut`` why the server cut its response short (None: it was not)."""
        model_label = self.model_label(model)
        self.child(self.requests, route, model_label, str(status), key or NO_KEY).inc()
        if cut is not None:
            self.requests_cut.labels(route, model_label, str(status),
                                     bounded(cut, CUT_REASONS, "other")).inc()
        self.child(self.request_duration, route, model_label).observe(max(0.0, seconds))

    def job_watch(self, route: str, model: str | None) -> JobWatch:
        return JobWatch(self, route, self.model_label(model))

    def exposition(self) -> bytes:
        """The text format of every metric now (call it on the event loop)."""
        return generate_latest(self.registry)

    # -- the event log ----------------------------------------------------------------------

    def on_event(self, event: Event) -> None:
        """Count a lifecycle event (an EventLog listener: quick, never blocks)."""
        model = bounded(event.model, self.physical_models, "unknown")
        match event.kind:
            case "transition":
                self._transition(model, event)
            case "evict":
                self.evictions.labels(model, evict_reason(event.reason)).inc()
            case "refuse":
                self.refusals.labels(model).inc()
            case "kill":
                self._killed.add(model)
                self.kills.labels(model, kill_reason(event.reason)).inc()
            case "release_unverified":
                self.unverified.labels(model).inc()

    def _transition(self, model: str, event: Event) -> None:
        origin, to = event.from_state, event.to_state
        if to == State.LOADING.value:
            self._loading_since[model] = event.at
        elif origin in LOAD_OUTCOMES:
            since = self._loading_since.pop(model, event.at)
            result = "loaded" if to == State.READY.value else "failed"
            self.loads.labels(model, result).inc()
            if result == "loaded":
                self.load_duration.labels(model).observe(max(0.0, event.at - since))
        elif to == State.FAILED.value:
            killed = model in self._killed
            self._killed.discard(model)
            if not killed:
                self.crashes.labels(model).inc()
            if origin != State.DRAINING.value:  # a drain was counted when it began
                self.unloads.labels(model, "killed" if killed else "crash").inc()
        elif to == State.DRAINING.value or (to == State.UNLOADING.value
                                            and origin == State.READY.value):
            self.unloads.labels(model, unload_reason(event.reason)).inc()
        elif to == State.UNLOADED.value:
            self._killed.discard(model)
