"""GpuArbiter: one per device; owns its memory ledger; nobody else loads anything.

It answers each ``Acquire`` with ``Granted`` or ``Refused``, asks victims to
``Evict``, and keeps the ledger equal to what is on the device: estimates while a
model loads, measured footprints once ``Loaded``, and a released model's bytes
until the device shows them free (on probes that can tell). Loads are serialised
per device, so a used-memory delta during a load is that model's.

The decisions come from the pure ``placement.plan`` (and ``placement.relieve``
when the device is over capacity); this module only applies them, records events,
and keeps time. It also keeps each loaded model's turn (guarantee 2: since when
others wait, and how many requests it started since), and re-measures loaded
workers every ``measure_interval_s``: one that grew past its footprint gets the new
figure in the ledger (and the footprint store), and the arbiter re-plans.

A load's measurement can be smaller than the model's need: weights are in place, but a
KV cache, activations or a caching allocator's pool grow with the first requests. So
the ledger keeps the larger of a load's measurement and the peak of the model's last
residency (what the store remembers), and a residency that served requests leaves its
own peak in the store: a reload reserves what the model used last time, and a model
that really shrank (a smaller context, a new quantisation) gets its smaller figure
after one residency.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any, Protocol

import anyio
import attrs

from llmux.actors.base import Actor, Clock
from llmux.actors.devices import DeviceProbe
from llmux.actors.events import EventLog
from llmux.actors.footprints import FootprintStore
from llmux.actors.messages import (
    Acquire,
    Evict,
    Granted,
    Loaded,
    LoadFailed,
    Message,
    Refused,
    ReleaseConfirmed,
    Released,
    Releasing,
    Usage,
    Withdraw,
)
from llmux.actors.placement import (
    DeviceView,
    Grant,
    Refuse,
    Residency,
    Resident,
    Rules,
    Wait,
    Want,
    plan,
    relieve,
)
from llmux.actors.placement import Evict as EvictPlan
from llmux.config_report import format_bytes

log = logging.getLogger(__name__)

MAILBOX_SIZE = 4096
REPLAN_INTERVAL_S = 0.25
RELEASE_TIMEOUT_S = 10.0
RELEASED_FRACTION = 0.9  # share of a footprint that must show up free to count as released
MEASURE_INTERVAL_S = 2.0
GROWTH_TOLERANCE = 0.1  # a worker this much above its footprint has grown: re-measured
# A request's start and end (Usage) re-plan with the device reading of the last this
# long ago, if our own ledger is unchanged since: two probe reads per request otherwise.
USAGE_READING_S = 0.25


class Mailbox(Protocol):
    def post(self, message: Any) -> None: ...


class Spares(Protocol):
    """Warm spare workers (llmux/spare.py) holding memory on this device outside the
    ledger of models: counted by their measured size, and the first thing to go."""

    def held_bytes(self) -> int: ...

    def drop(self) -> bool:
        """Kill every spare now; True if any held memory."""
        ...


@attrs.frozen(kw_only=True)
class ModelSpec:
    """What the arbiter knows of a model from the config."""

    model: str
    klass: str
    priority: int
    estimate: int
    group: str | None = None
    pinned: bool = False


@attrs.define(kw_only=True)
class _Entry:
    spec: ModelSpec
    bytes: int
    measured: bool
    residency: Residency
    loaded_at: float
    last_used: float
    busy: bool = False
    queued: int = 0
    used_baseline: int = 0  # device usage while the model still held its memory
    pid: int | None = None  # the loaded worker, for re-measuring it
    peak: int = 0  # the largest this residency's worker was measured at
    started: int = 0  # requests started since it loaded
    turn_since: float | None = None  # others have waited for the device since then
    turn_base: int = 0  # ``started`` when its turn began
    load_s: float = 0.0  # how long its last load took (grant to loaded)


@attrs.frozen(kw_only=True)
class _Reading:
    """The device's memory as the probe last showed it, and our ledger's total then."""

    at: float
    ours: int
    total: int
    used: int


@attrs.define(kw_only=True)
class _Pending:
    model: str
    deadline: float
    seq: int
    evict: bool = True
    reason: str = "planning"


class GpuArbiter(Actor[Message]):
    def __init__(
        self,
        *,
        device: str,
        capacity: int | None,
        safety_margin: int,
        probe: DeviceProbe,
        rules: Rules,
        models: Mapping[str, ModelSpec],
        footprints: FootprintStore,
        events: EventLog,
        clock: Clock,
        release_timeout_s: float = RELEASE_TIMEOUT_S,
        measure_interval_s: float = MEASURE_INTERVAL_S,
        spares: Spares | None = None,
    ) -> None:
        super().__init__(f"arbiter[{device}]", mailbox_size=MAILBOX_SIZE, clock=clock)
        self._spares = spares
        self.device = device
        self._capacity = capacity
        self._margin = safety_margin
        self._probe = probe
        self._rules = rules
        self._models = dict(models)
        self._footprints = footprints
        self._events = events
        self._release_timeout_s = release_timeout_s
        self._measure_interval_s = measure_interval_s
        self._next_measure = math.inf
        self._actors: dict[str, Mailbox] = {}
        self._ledger: dict[str, _Entry] = {}
        self._pending: list[_Pending] = []
        # The last plan found the device over capacity with nothing it could unload yet:
        # a request's end (Usage) may free a victim.
        self._pressed = False
        # Each model's last reported queue, also while it is not in the ledger: a model
        # granted with work waiting has it from its first plan (else it looks idle).
        self._queued: dict[str, int] = {}
        self._seq = 0
        self._loading: str | None = None
        self._reading: _Reading | None = None

    def connect(self, actors: Mapping[str, Mailbox]) -> None:
        """Where to send Granted, Refused and Evict (the model actors' mailboxes)."""
        self._actors = dict(actors)

    # -- the ledger ----------------------------------------------------------------------

    def footprint(self, model: str) -> tuple[int, bool]:
        """Bytes the model takes (or would take) here, and whether that was measured."""
        entry = self._ledger.get(model)
        if entry is not None:
            return entry.bytes, entry.measured
        measured = self._footprints.get(model, self.device)
        if measured is not None:
            return measured, True
        return self._models[model].estimate, False

    def usable(self, recent: bool = False) -> int:
        """Capacity for planning: budget or total, minus margin, minus foreign use,
        minus what warm spares hold. ``recent``: a device reading up to
        USAGE_READING_S old will do, if our own ledger has not changed since."""
        held = self._spares.held_bytes() if self._spares is not None else 0
        if self._capacity is not None:
            return self._capacity - self._margin - held
        ours = sum(e.bytes for e in self._ledger.values()) + held
        reading = self._reading
        if not (recent and reading is not None and reading.ours == ours
                and self.clock() - reading.at < USAGE_READING_S):
            reading = self._reading = _Reading(
                at=self.clock(), ours=ours, total=self._probe.total_bytes(),
                used=self._probe.used_bytes())
        foreign = max(0, reading.used - ours)
        return reading.total - self._margin - foreign - held

    def view(self, recent: bool = False) -> DeviceView:
        residents = tuple(
            Resident(
                model=m,
                klass=e.spec.klass,
                priority=e.spec.priority,
                bytes=e.bytes,
                group=e.spec.group,
                pinned=e.spec.pinned,
                residency=e.residency,
                busy=e.busy,
                queued=e.queued,
                loaded_at=e.loaded_at,
                last_used=e.last_used,
                turn_since=e.turn_since,
                turn_requests=e.started - e.turn_base,
                load_s=e.load_s,
            )
            for m, e in self._ledger.items()
        )
        return DeviceView(device=self.device, capacity=self.usable(recent),
                          residents=residents)

    # -- messages ------------------------------------------------------------------------

    def handle(self, message: Message) -> None:
        match message:
            case Acquire(model=model, deadline=deadline, evict=evict):
                self._acquire(model, deadline, evict)
            case Withdraw(model=model):
                self._pending = [p for p in self._pending if p.model != model]
            case Loaded(model=model, pid=pid, reported_bytes=reported):
                self._loaded(model, pid, reported)
            case LoadFailed(model=model, reason=reason):
                self._ledger.pop(model, None)
                self._finish_loading(model)
            case Releasing(model=model):
                if (entry := self._ledger.get(model)) is not None:
                    entry.used_baseline = self._probe.used_bytes()
                    self._measure_peak(entry)  # its last chance: the worker is leaving
            case Released(model=model, reason=reason):
                self._released(model, reason)
            case ReleaseConfirmed(model=model, verified=verified):
                self._ledger.pop(model, None)
                if not verified:
                    self._events.record(
                        model, "release_unverified",
                        f"{self.device} did not show the memory of {model} free "
                        f"within {self._release_timeout_s:.0f} s",
                    )
            case Usage(model=model, busy=busy, queued=queued, last_used=last_used,
                       started=started):
                self._queued[model] = queued
                if (entry := self._ledger.get(model)) is not None:
                    entry.busy, entry.queued, entry.last_used = busy, queued, last_used
                    entry.started = started
                if not self._pending and not self._pressed:
                    return  # nothing waits and nothing must go: nothing to plan
            case _:
                log.error("%s: unexpected message %r", self.name, message)
        self._replan(recent=isinstance(message, Usage))

    def _acquire(self, model: str, deadline: float, evict: bool) -> None:
        entry = self._ledger.get(model)
        if entry is not None and entry.residency in (Residency.LOADING, Residency.LOADED):
            return  # its actor took a grant that crossed its Withdraw: it has the room
        for pending in self._pending:
            if pending.model == model:
                pending.deadline = max(pending.deadline, deadline)
                pending.evict = pending.evict or evict
                return
        self._seq += 1
        self._pending.append(_Pending(model=model, deadline=deadline, seq=self._seq,
                                      evict=evict))
        self._pending.sort(key=lambda p: (-self._models[p.model].priority, p.seq))

    def _loaded(self, model: str, pid: int, reported: int | None) -> None:
        entry = self._ledger.get(model)
        if entry is None:
            return
        measured = self._probe.footprint(pid, entry.used_baseline) or reported or entry.bytes
        last_peak = self._footprints.get(model, self.device)
        if last_peak is not None and last_peak > measured:
            self._events.record(
                model, "measure",
                f"footprint on {self.device}: {format_bytes(measured)} measured at load; "
                f"keeps {format_bytes(last_peak)}, its peak when last loaded",
            )
        else:
            was = "measured" if entry.measured else "estimated"
            self._events.record(
                model, "measure",
                f"footprint on {self.device}: {format_bytes(measured)} measured "
                f"(was {format_bytes(entry.bytes)} {was})",
            )
            self._footprints.put(model, self.device, measured)
        entry.bytes, entry.measured = max(measured, last_peak or 0), True
        entry.peak = measured
        entry.residency = Residency.LOADED
        entry.load_s = self.clock() - entry.loaded_at  # loaded_at was the grant
        entry.loaded_at = entry.last_used = self.clock()
        entry.used_baseline = self._probe.used_bytes()
        entry.pid, entry.started = pid, 0
        self._finish_loading(model)
        if self._next_measure == math.inf:
            self._next_measure = self.clock() + self._measure_interval_s

    def _remeasure(self) -> None:
        """Re-read each loaded worker's memory; one that grew past its footprint gets
        the new figure (a re-plan follows: it may now need room)."""
        for model, entry in self._ledger.items():
            if entry.residency is not Residency.LOADED:
                continue
            now_bytes = self._measure_peak(entry)
            if now_bytes is None or now_bytes <= entry.bytes * (1 + GROWTH_TOLERANCE):
                continue
            self._events.record(
                model, "measure",
                f"footprint on {self.device}: grew from {format_bytes(entry.bytes)} to "
                f"{format_bytes(now_bytes)} while loaded; re-measured",
            )
            entry.bytes = now_bytes
            self._footprints.put(model, self.device, now_bytes)
        loaded = any(e.residency is Residency.LOADED for e in self._ledger.values())
        self._next_measure = self.clock() + self._measure_interval_s if loaded else math.inf

    def _measure_peak(self, entry: _Entry) -> int | None:
        """Bytes the entry's worker holds now (None: not measurable), kept in its
        residency's peak."""
        if entry.pid is None:
            return None
        now_bytes = self._probe.process_bytes(entry.pid)
        if now_bytes is not None:
            entry.peak = max(entry.peak, now_bytes)
        return now_bytes

    def _remember_peak(self, model: str, entry: _Entry) -> None:
        """A residency that served requests leaves its peak for the next load to plan
        with, smaller or larger than the last one's (one that served none says little
        about what requests need)."""
        last_peak = self._footprints.get(model, self.device)
        if not entry.started or not entry.peak or entry.peak == last_peak:
            return
        self._footprints.put(model, self.device, entry.peak)
        if last_peak is not None and entry.peak < last_peak:
            self._events.record(
                model, "measure",
                f"footprint on {self.device}: {format_bytes(entry.peak)} at most while "
                f"loaded, down from {format_bytes(last_peak)}; remembered for its next load",
            )

    def _finish_loading(self, model: str) -> None:
        if self._loading == model:
            self._loading = None

    def _released(self, model: str, reason: str) -> None:
        self._finish_loading(model)
        entry = self._ledger.get(model)
        if entry is None:
            return
        self._remember_peak(model, entry)
        if not self._probe.verify_release:
            del self._ledger[model]
            return
        entry.residency = Residency.RELEASING
        # What its worker was seen to hold, not a larger remembered peak it never reached.
        baseline, freed = entry.used_baseline, entry.peak or entry.bytes
        self.spawn(lambda: self._confirm_release(model, baseline, freed), f"release:{model}")

    async def _confirm_release(self, model: str, baseline: int, freed: int) -> None:
        """Poll the device until the freed bytes show up, bounded by the timeout."""
        verified = False
        with anyio.move_on_after(self._release_timeout_s):
            # NOTE: polling, not an event: only the device can say the memory is back.
            while self._probe.used_bytes() > baseline - freed * RELEASED_FRACTION:  # noqa: ASYNC110
                await anyio.sleep(REPLAN_INTERVAL_S)
            verified = True
        self.post(ReleaseConfirmed(model, verified))

    # -- planning ------------------------------------------------------------------------

    def _replan(self, recent: bool = False) -> None:
        """Apply the placement policy to the ledger and the waiting models. ``recent``:
        a request's start or end (Usage), which may use a recent device reading."""
        now = self.clock()
        for pending in [p for p in self._pending if p.deadline <= now]:
            self._pending.remove(pending)
            self._tell(pending.model, Refused(
                pending.model, f"timed out waiting for memory on {self.device}: "
                f"{pending.reason}", permanent=False,
            ))
        self._update_turns(now)
        relief = relieve(self.view(recent), self._rules, now)
        if isinstance(relief, EvictPlan) and self._spares is not None and self._spares.drop():
            relief = relieve(self.view(recent), self._rules, now)  # a spare goes before a model
        self._pressed = isinstance(relief, Wait)
        if isinstance(relief, EvictPlan):
            self._evict(relief)
        while self._pending and self._loading is None:
            head = self._pending[0]
            spec = self._models[head.model]
            size, _ = self.footprint(head.model)
            want = Want(model=spec.model, klass=spec.klass, priority=spec.priority,
                        bytes=size, group=spec.group)
            decision = plan(self.view(recent), want, self._rules, now)
            if self._drop_spares_for(decision, want, now, recent):
                continue
            if not head.evict and isinstance(decision, EvictPlan | Wait):
                self._not_now(head, decision)
                continue
            match decision:
                case Grant():
                    self._grant(head, size)
                case EvictPlan(reasons=reasons) as evict:
                    head.reason = "; ".join(reasons)
                    self._evict(evict)
                    return
                case Wait(reason=reason):
                    head.reason = reason
                    return
                case Refuse(reason=reason):
                    self._pending.pop(0)
                    self._events.record(head.model, "refuse", reason)
                    self._tell(head.model, Refused(head.model, reason, permanent=True))

    def _not_now(self, head: _Pending, decision: EvictPlan | Wait) -> None:
        """``head`` may only take free room (it retries by itself after a failed load)
        and there is none: refused for now, so it neither evicts nor holds the queue."""
        self._pending.pop(0)
        why = "; ".join(decision.reasons) if isinstance(decision, EvictPlan) else decision.reason
        reason = f"not retried by itself while it would have to wait or evict ({why})"
        self._events.record(head.model, "refuse", reason)
        self._tell(head.model, Refused(head.model, reason, permanent=False))

    def _drop_spares_for(self, decision: object, want: Want, now: float,
                         recent: bool) -> bool:
        """Drop the warm spares if their memory would turn ``decision`` into a grant
        or spare a victim: a spare never costs a model its place (True: replan)."""
        held = self._spares.held_bytes() if self._spares is not None else 0
        if not held or isinstance(decision, Grant):
            return False
        view = self.view(recent)
        roomier = plan(attrs.evolve(view, capacity=view.capacity + held), want,
                       self._rules, now)
        better = isinstance(roomier, Grant) or (
            isinstance(roomier, EvictPlan) and isinstance(decision, EvictPlan)
            and len(roomier.victims) < len(decision.victims)) or (
            isinstance(decision, Refuse) and not isinstance(roomier, Refuse))
        return better and self._spares is not None and self._spares.drop()

    def _evict(self, evict: EvictPlan) -> None:
        for victim, reason in zip(evict.victims, evict.reasons, strict=True):
            entry = self._ledger[victim]
            entry.residency = Residency.EVICTING
            entry.used_baseline = self._probe.used_bytes()
            self._events.record(victim, "evict", reason)
            self._tell(victim, Evict(reason))

    def _update_turns(self, now: float) -> None:
        """A loaded model's turn begins when others start waiting for the device (or
        when it loads while they wait) and ends when nobody waits any more."""
        contended = bool(self._pending)
        for entry in self._ledger.values():
            if not contended or entry.residency is not Residency.LOADED:
                entry.turn_since = None
            elif entry.turn_since is None:
                entry.turn_since, entry.turn_base = now, entry.started

    def _grant(self, head: _Pending, size: int) -> None:
        self._pending.pop(0)
        now = self.clock()
        _, measured = self.footprint(head.model)
        self._ledger[head.model] = _Entry(
            spec=self._models[head.model], bytes=size, measured=measured,
            residency=Residency.LOADING, loaded_at=now, last_used=now,
            used_baseline=self._probe.used_bytes(), queued=self._queued.get(head.model, 0),
        )
        self._loading = head.model
        self._tell(head.model, Granted(head.model, self))

    def _tell(self, model: str, message: Message) -> None:
        self._actors[model].post(message)

    def next_wakeup(self) -> float:
        if not self._pending:
            return self._next_measure
        soonest = min(p.deadline for p in self._pending)
        return min(soonest, self.clock() + REPLAN_INTERVAL_S, self._next_measure)

    def on_timer(self) -> None:
        if self.clock() >= self._next_measure:
            self._remeasure()
        self._replan()

    # -- observation -------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The device as ``/admin/state`` shows it."""
        used = sum(e.bytes for e in self._ledger.values() if e.residency is Residency.LOADED)
        reserved = sum(
            e.bytes for e in self._ledger.values() if e.residency is not Residency.LOADED
        )
        capacity = self.usable()
        return {
            "id": self.device,
            "capacity_bytes": capacity,
            "capacity_source": "budget" if self._capacity is not None else "measured",
            "safety_margin_bytes": self._margin,
            "used_bytes": used,
            "reserved_bytes": reserved,
            "free_bytes": capacity - used - reserved,
            "loading": self._loading,
            "spare_bytes": self._spares.held_bytes() if self._spares is not None else 0,
            "ledger": [
                {
                    "model": m,
                    "bytes": e.bytes,
                    "measured": e.measured,
                    # What this residency's worker was seen to hold at most: less than
                    # ``bytes`` while the ledger keeps the peak of its last residency.
                    "peak_bytes": e.peak,
                    "residency": e.residency.value,
                    "busy": e.busy,
                    "queued": e.queued,
                    "turn_requests": e.started - e.turn_base if e.turn_since is not None
                    else None,
                    "load_s": round(e.load_s, 3),
                }
                for m, e in self._ledger.items()
            ],
            "pending": [
                {"model": p.model, "reason": p.reason} for p in self._pending
            ],
        }
