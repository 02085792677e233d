"""The arbiter re-measures loaded workers: one that grew past its footprint gets the
new figure in the ledger and the footprint store, and the arbiter re-plans (an
over-full device sheds an idle model). A reload keeps the peak its last residency
reached. Driven synchronously with scripted memory and time, as the stateful test
does."""

from __future__ import annotations

from typing import Any

import anyio

from llmux.actors.arbiter import MEASURE_INTERVAL_S, GpuArbiter, ModelSpec
from llmux.actors.events import EventLog
from llmux.actors.footprints import FootprintStore
from llmux.actors.messages import (
    Acquire,
    Evict,
    Granted,
    Loaded,
    ReleaseConfirmed,
    Released,
    Releasing,
    Usage,
)
from llmux.actors.placement import Rules

MB = 1_000_000
MODELS = {name: ModelSpec(model=name, klass="llm", priority=10, estimate=200 * MB)
          for name in ("a", "b")}


class Probe:
    verify_release = False

    def __init__(self) -> None:
        self.held: dict[int, int] = {}

    def total_bytes(self) -> int:
        return 10**12

    def used_bytes(self) -> int:
        return sum(self.held.values())

    def footprint(self, pid: int, used_at_grant: int) -> int:
        return self.held[pid]

    def process_bytes(self, pid: int) -> int | None:
        return self.held.get(pid)


class World:
    def __init__(self, capacity: int, probe: Probe | None = None) -> None:
        self.now = 0.0
        self.probe = probe or Probe()
        self.told: list[tuple[str, Any]] = []
        self.events = EventLog()
        self.footprints = FootprintStore(None)
        self.arbiter = GpuArbiter(
            device="cpu", capacity=capacity, safety_margin=0, probe=self.probe,
            rules=Rules(), models=MODELS, footprints=self.footprints, events=self.events,
            clock=lambda: self.now,
        )
        self.arbiter.connect({m: _Box(self, m) for m in MODELS})

    def load(self, model: str, pid: int, nbytes: int) -> None:
        self.arbiter.handle(Acquire(model, self.now + 60))
        assert (model, Granted(model, self.arbiter)) in self.told
        self.probe.held[pid] = nbytes
        self.arbiter.handle(Loaded(model, pid, None))

    def serve(self, model: str) -> None:
        """One request starts and ends (the model actor's Usage reports)."""
        self.arbiter.handle(Usage(model, True, 0, self.now, 1))
        self.arbiter.handle(Usage(model, False, 0, self.now, 1))

    def unload(self, model: str, pid: int) -> None:
        """The model stops its worker, which exits."""
        self.arbiter.handle(Releasing(model))
        del self.probe.held[pid]
        self.arbiter.handle(Released(model, "unloaded"))

    def measures(self) -> list[str]:
        return [e.reason for e in self.events if e.kind == "measure"]

    def ledger(self) -> dict[str, int]:
        return {e["model"]: e["bytes"] for e in self.arbiter.snapshot()["ledger"]}

    def tick(self, seconds: float) -> None:
        self.now += seconds
        self.arbiter.on_timer()


class _Box:
    def __init__(self, world: World, model: str) -> None:
        self.world, self.model = world, model

    def post(self, message: Any) -> None:
        self.world.told.append((self.model, message))


def test_a_worker_that_grew_is_re_measured_and_remembered() -> None:
    world = World(capacity=1000 * MB)
    world.load("a", 101, 160 * MB)
    world.probe.held[101] = 300 * MB
    world.tick(MEASURE_INTERVAL_S)
    assert world.ledger() == {"a": 300 * MB}
    assert world.footprints.get("a", "cpu") == 300 * MB
    grew = [e.reason for e in world.events if e.kind == "measure"][-1]
    assert grew == "footprint on cpu: grew from 160.0 MB to 300.0 MB while loaded; re-measured"


def test_a_later_load_does_not_put_off_the_next_measurement() -> None:
    # Else a device where models keep loading would never re-measure the first.
    world = World(capacity=1000 * MB)
    world.load("a", 101, 160 * MB)
    world.now += MEASURE_INTERVAL_S * 0.75
    world.load("b", 102, 160 * MB)
    world.probe.held[101] = 300 * MB
    world.tick(MEASURE_INTERVAL_S * 0.25)
    assert world.ledger()["a"] == 300 * MB


def test_noise_below_the_tolerance_is_not_a_growth() -> None:
    world = World(capacity=1000 * MB)
    world.load("a", 101, 160 * MB)
    world.probe.held[101] = 170 * MB
    world.tick(MEASURE_INTERVAL_S)
    assert world.ledger() == {"a": 160 * MB}


def test_a_growth_that_overfills_the_device_evicts_an_idle_model() -> None:
    world = World(capacity=400 * MB)
    world.load("a", 101, 150 * MB)
    world.now += 1
    world.load("b", 102, 150 * MB)
    world.arbiter.handle(Usage("b", True, 0, world.now, 1))
    world.probe.held[102] = 350 * MB  # b grows while serving: 500 MB on a 400 MB device
    world.tick(MEASURE_INTERVAL_S)
    evicts = [(m, msg.reason) for m, msg in world.told if isinstance(msg, Evict)]
    assert evicts == [("a", "evicted a (llm): cpu holds 500.0 MB of 400.0 MB after a model grew "
                             "past its footprint")]


def test_an_overfull_device_sheds_a_busy_model_as_soon_as_its_request_ends() -> None:
    world = World(capacity=400 * MB)
    world.load("a", 101, 150 * MB)
    world.arbiter.handle(Usage("a", True, 0, world.now, 1))  # a serves a request
    world.now += 1
    world.load("b", 102, 150 * MB)
    world.arbiter.handle(Usage("b", True, 0, world.now, 1))
    world.probe.held[102] = 350 * MB  # b grows: 500 MB on a 400 MB device
    world.tick(MEASURE_INTERVAL_S)
    assert not [m for m, msg in world.told if isinstance(msg, Evict)]  # both are busy
    world.arbiter.handle(Usage("a", False, 0, world.now, 1))  # its request ends: a may go
    assert [m for m, msg in world.told if isinstance(msg, Evict)] == ["a"]


def test_a_request_starting_or_ending_on_a_roomy_device_changes_no_plan() -> None:
    world = World(capacity=1000 * MB)
    world.load("a", 101, 150 * MB)
    told = len(world.told)
    world.arbiter.handle(Usage("a", True, 0, world.now, 1))
    world.arbiter.handle(Usage("a", False, 0, world.now, 1))
    assert world.told[told:] == []
    assert world.arbiter.snapshot()["ledger"][0]["busy"] is False


def test_a_reload_keeps_the_peak_its_last_residency_reached() -> None:
    # A load measures the weights; the KV cache and the allocator's pool come with the
    # first requests. Planning the reload on the load's figure would admit another
    # model into room this one is about to need again.
    world = World(capacity=1000 * MB)
    world.load("a", 101, 160 * MB)
    world.serve("a")
    world.probe.held[101] = 300 * MB
    world.tick(MEASURE_INTERVAL_S)
    world.unload("a", 101)
    assert world.arbiter.footprint("a") == (300 * MB, True)
    world.load("a", 102, 160 * MB)
    assert world.ledger() == {"a": 300 * MB}
    assert world.arbiter.snapshot()["ledger"][0]["peak_bytes"] == 160 * MB
    assert world.measures()[-1] == ("footprint on cpu: 160.0 MB measured at load; "
                                    "keeps 300.0 MB, its peak when last loaded")
    assert world.footprints.get("a", "cpu") == 300 * MB


def test_a_residency_that_served_requests_leaves_its_own_peak_for_the_next_load() -> None:
    # A model that really shrank (a smaller context in its options) gets its smaller
    # figure after one residency, not never.
    world = World(capacity=1000 * MB)
    world.footprints.put("a", "cpu", 300 * MB)
    world.load("a", 101, 160 * MB)
    world.serve("a")
    world.probe.held[101] = 200 * MB
    world.tick(MEASURE_INTERVAL_S)
    assert world.ledger() == {"a": 300 * MB}  # no growth past what it holds
    world.unload("a", 101)
    assert world.footprints.get("a", "cpu") == 200 * MB
    assert world.measures()[-1] == ("footprint on cpu: 200.0 MB at most while loaded, "
                                    "down from 300.0 MB; remembered for its next load")
    world.load("a", 102, 160 * MB)
    assert world.ledger() == {"a": 200 * MB}


def test_a_residency_that_served_no_request_leaves_the_remembered_peak() -> None:
    world = World(capacity=1000 * MB)
    world.footprints.put("a", "cpu", 300 * MB)
    world.load("a", 101, 160 * MB)
    world.tick(MEASURE_INTERVAL_S)
    world.unload("a", 101)
    assert world.footprints.get("a", "cpu") == 300 * MB


def test_a_load_larger_than_the_remembered_peak_is_remembered_at_once() -> None:
    world = World(capacity=1000 * MB)
    world.footprints.put("a", "cpu", 100 * MB)
    world.load("a", 101, 160 * MB)
    assert world.ledger() == {"a": 160 * MB}
    assert world.footprints.get("a", "cpu") == 160 * MB
    assert world.measures()[-1] == "footprint on cpu: 160.0 MB measured (was 100.0 MB measured)"


def test_the_worker_is_measured_once_more_as_it_leaves() -> None:
    # Growth inside the tolerance, or since the last re-measure, still counts.
    world = World(capacity=1000 * MB)
    world.load("a", 101, 160 * MB)
    world.serve("a")
    world.probe.held[101] = 170 * MB
    world.unload("a", 101)
    assert world.footprints.get("a", "cpu") == 170 * MB


class ReleaseProbe(Probe):
    verify_release = True


def test_a_release_is_verified_by_what_the_worker_held_not_the_remembered_peak() -> None:
    # The ledger reserved a's last peak (300 MB), but this worker held 160 MB: waiting
    # for 300 MB to come free would time out and hold the device's room meanwhile.
    world = World(capacity=1000 * MB, probe=ReleaseProbe())
    world.probe.held[900] = 50 * MB  # someone else's
    world.footprints.put("a", "cpu", 300 * MB)
    world.load("a", 101, 160 * MB)
    spawned: list[Any] = []
    posted: list[Any] = []
    world.arbiter.spawn = lambda fn, name: spawned.append(fn)  # type: ignore[method-assign]
    world.arbiter.post = posted.append  # type: ignore[method-assign]
    world.arbiter._release_timeout_s = 1.0
    world.unload("a", 101)
    [confirm] = spawned
    anyio.run(confirm)
    assert posted == [ReleaseConfirmed("a", verified=True)]
