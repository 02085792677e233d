"""A hypothesis stateful test of the GpuArbiter: random model traffic, scripted
memory and time, the arbiter's handler driven directly (it never awaits).

Invariants: the ledger never exceeds capacity; no pinned model is told to evict,
and a busy one only once it has had a full turn (``max_turn_requests`` requests or
``max_turn_wait_s`` since it loaded: it then drains); an exclusive group holds at most
one model; every Acquire is answered before its deadline; the ledger equals the sum
of the loaded footprints."""

from __future__ import annotations

from typing import Any

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from llmux.actors.arbiter import GpuArbiter, ModelSpec
from llmux.actors.events import EventLog
from llmux.actors.footprints import FootprintStore
from llmux.actors.messages import (
    Acquire,
    Evict,
    Granted,
    Loaded,
    LoadFailed,
    Refused,
    Released,
    Usage,
)
from llmux.actors.placement import Residency, Rules

GB = 1_000_000_000
CAPACITY = 16 * GB
DEADLINE_S = 30.0
RULES = Rules(strict_priority=False, min_residency_s=5.0, max_turn_requests=3,
              max_turn_wait_s=15.0)
MODELS = {
    "qwen9": ModelSpec(model="qwen9", klass="llm", priority=10, estimate=9 * GB, group="llm"),
    "qwen4": ModelSpec(model="qwen4", klass="llm", priority=10, estimate=4 * GB, group="llm"),
    "gptoss": ModelSpec(model="gptoss", klass="llm", priority=10, estimate=13 * GB, group="llm"),
    "asr": ModelSpec(model="asr", klass="asr", priority=30, estimate=4 * GB),
    "tts1": ModelSpec(model="tts1", klass="tts", priority=20, estimate=2 * GB, group="tts"),
    "tts2": ModelSpec(model="tts2", klass="tts", priority=20, estimate=2 * GB, group="tts"),
    "embed": ModelSpec(model="embed", klass="embedding", priority=15, estimate=1 * GB,
                       pinned=True),
    "huge": ModelSpec(model="huge", klass="llm", priority=10, estimate=20 * GB, group="llm"),
}
names = st.sampled_from(sorted(MODELS))


class ScriptedProbe:
    """Device usage = what the simulated workers hold."""

    verify_release = False

    def __init__(self) -> None:
        self.held: dict[str, int] = {}
        self.pids: dict[int, str] = {}

    def total_bytes(self) -> int:
        return CAPACITY

    def used_bytes(self) -> int:
        return sum(self.held.values())

    def footprint(self, pid: int, used_at_grant: int) -> int:
        return self.held[self.pids[pid]]

    def process_bytes(self, pid: int) -> int | None:
        return self.held.get(self.pids[pid])


class Recorder:
    """A model actor's mailbox: records what the arbiter tells it."""

    def __init__(self, machine: ArbiterMachine, model: str) -> None:
        self.machine, self.model = machine, model

    def post(self, message: Any) -> None:
        self.machine.received(self.model, message)


class ArbiterMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.probe = ScriptedProbe()
        self.arbiter = GpuArbiter(
            device="cuda:0", capacity=CAPACITY, safety_margin=0, probe=self.probe,
            rules=RULES, models=MODELS,
            footprints=FootprintStore(None), events=EventLog(), clock=lambda: self.now,
        )
        self.arbiter.connect({m: Recorder(self, m) for m in MODELS})
        # simulated model actors
        self.state = dict.fromkeys(MODELS, "unloaded")
        self.busy: set[str] = set()
        self.started = dict.fromkeys(MODELS, 0)  # requests started since it loaded
        self.loaded_at = dict.fromkeys(MODELS, 0.0)
        self.deadlines: dict[str, float] = {}
        self.violations: list[str] = []

    # -- what the arbiter says --------------------------------------------------------

    def received(self, model: str, message: Any) -> None:
        match message:
            case Granted():
                assert self.state[model] == "wanting", (model, self.state[model])
                self.state[model] = "loading"
                self.deadlines.pop(model)
            case Refused():
                assert self.state[model] == "wanting"
                self.state[model] = "unloaded"
                self.deadlines.pop(model)
            case Evict():
                had_turn = (self.started[model] >= RULES.max_turn_requests
                            or self.now - self.loaded_at[model] >= RULES.max_turn_wait_s)
                if model in self.busy and not had_turn:
                    self.violations.append(f"{model} told to evict while busy")
                if MODELS[model].pinned:
                    self.violations.append(f"pinned {model} told to evict")
                if self.state[model] == "loaded":
                    self.state[model] = "evicting"

    def handle(self, message: Any) -> None:
        self.arbiter.handle(message)

    # -- traffic ------------------------------------------------------------------------

    @rule(model=names)
    def request(self, model: str) -> None:
        if self.state[model] == "unloaded":
            self.state[model] = "wanting"
            self.deadlines[model] = self.now + DEADLINE_S
            self.handle(Acquire(model, self.now + DEADLINE_S))

    @rule(model=names, share=st.floats(0.5, 1.0))
    def finish_load(self, model: str, share: float) -> None:
        if self.state[model] == "loading":
            pid = 1000 + sorted(MODELS).index(model)
            self.probe.pids[pid] = model
            self.probe.held[model] = int(MODELS[model].estimate * share)
            self.state[model] = "loaded"
            self.started[model], self.loaded_at[model] = 0, self.now
            self.handle(Loaded(model, pid, None))

    @rule(model=names)
    def fail_load(self, model: str) -> None:
        if self.state[model] == "loading":
            self.state[model] = "unloaded"
            self.handle(LoadFailed(model, "scripted failure"))

    @rule(model=names)
    def start_work(self, model: str) -> None:
        if self.state[model] == "loaded" and model not in self.busy:
            self.busy.add(model)
            self.started[model] += 1
            self.handle(Usage(model, True, 1, self.now, self.started[model]))

    @rule(model=names)
    def finish_work(self, model: str) -> None:
        if model in self.busy:
            self.busy.discard(model)
            self.handle(Usage(model, False, 0, self.now, self.started[model]))

    @rule(model=names)
    def finish_eviction(self, model: str) -> None:
        if self.state[model] == "evicting" and model not in self.busy:
            self.probe.held.pop(model, None)
            self.state[model] = "unloaded"
            self.handle(Released(model, "evicted"))

    @precondition(lambda self: any(s == "loaded" for s in self.state.values()))
    @rule(model=names)
    def crash(self, model: str) -> None:
        if self.state[model] in ("loaded", "evicting"):
            self.probe.held.pop(model, None)
            self.busy.discard(model)
            self.state[model] = "unloaded"
            self.handle(Released(model, "crashed"))

    @rule(seconds=st.floats(0.1, 20.0))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        self.arbiter.on_timer()

    # -- invariants ---------------------------------------------------------------------

    @invariant()
    def ledger_never_exceeds_capacity(self) -> None:
        assert sum(e["bytes"] for e in self.arbiter.snapshot()["ledger"]) <= CAPACITY

    @invariant()
    def no_busy_or_pinned_model_was_evicted(self) -> None:
        assert self.violations == []

    @invariant()
    def exclusive_groups_hold(self) -> None:
        groups = [MODELS[e["model"]].group for e in self.arbiter.snapshot()["ledger"]]
        present = [g for g in groups if g is not None]
        assert len(present) == len(set(present)), groups

    @invariant()
    def acquires_are_answered_before_their_deadline(self) -> None:
        assert all(deadline > self.now for deadline in self.deadlines.values()), (
            self.now, self.deadlines)

    @invariant()
    def ledger_equals_loaded_footprints(self) -> None:
        loaded = {e["model"]: e["bytes"] for e in self.arbiter.snapshot()["ledger"]
                  if e["residency"] == Residency.LOADED.value}
        held = {m: b for m, b in self.probe.held.items() if self.state[m] == "loaded"}
        assert loaded == held


ArbiterMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                            deadline=None)
TestArbiter = ArbiterMachine.TestCase
