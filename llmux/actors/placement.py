"""Placement policy: the arbiter's pure core.

``plan(view, want, rules, now)`` decides, for one device, whether a model that
wants to load may load now (``Grant``), must first have others unloaded
(``Evict``), has to wait for busy or fresh models (``Wait``), or can never fit as
configured (``Refuse``). It does no I/O, reads no clock and logs nothing, so it is
tested exhaustively; the arbiter applies its decisions.

Rules (DESIGN.md, "Placement policy"):
- an exclusive group holds at most one loaded model: members of the wanted model's
  group are always victims;
- evict the lowest priority class first, least recently used first within a class;
  higher classes only as a last resort, and never under ``strict_priority``;
- pinned models are never evicted;
- busy models, models still loading, and models within their minimum residency
  that still have queued work are not evicted *now*: the requester waits;
- turns (guarantee 2): while others wait for the device, a loaded model keeps it for
  one turn while it has work: busy, queued, or within a short linger after each
  request (its client's next one is likely on the way), so alternating clients cause
  few swaps.
  A turn ends after ``max_turn_requests`` requests, but not before it lasted
  ``turn_load_multiple`` times the model's own load time (so that swapping costs at
  most about 1/(1 + multiple) of the device's time, however short the requests), or
  after ``max_turn_wait_s`` whatever it served; then the model is evicted even if busy
  or queued (it drains its running request first);
- a device over capacity (a model grew past its measured footprint) sheds idle
  models by the same order (``relieve``);
- a model that could only fit by evicting what may never be evicted, or that is
  bigger than the device, is refused at once, with the reason.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import attrs

from llmux.config_report import format_bytes


class Residency(enum.Enum):
    """Where a resident stands in the ledger."""

    LOADING = "loading"  # granted, worker starting; counted at its estimate
    LOADED = "loaded"  # serving or idle
    EVICTING = "evicting"  # told to unload; its bytes come back soon
    RELEASING = "releasing"  # worker gone; waiting for the device to show the bytes free


@attrs.frozen(kw_only=True)
class Resident:
    """A model that holds (or is about to hold, or still holds) memory on the device."""

    model: str
    klass: str  # priority class name, for explanations
    priority: int  # bigger is more important
    bytes: int
    group: str | None = None
    pinned: bool = False
    residency: Residency = Residency.LOADED
    busy: bool = False  # a request is in flight
    queued: int = 0  # requests waiting for it
    loaded_at: float = 0.0
    last_used: float = 0.0
    # Its turn: since when others have waited for the device while it held it (None:
    # nobody waits), and how many requests it started since then.
    turn_since: float | None = None
    turn_requests: int = 0
    load_s: float = 0.0  # how long its last load took: what bringing it back costs


@attrs.frozen(kw_only=True)
class Want:
    """A model asking to load."""

    model: str
    klass: str
    priority: int
    bytes: int
    group: str | None = None


@attrs.frozen(kw_only=True)
class Rules:
    strict_priority: bool = False
    min_residency_s: float = 0.0
    max_turn_requests: int = 8
    max_turn_wait_s: float = 30.0
    turn_load_multiple: float = 0.0
    turn_linger_s: float = 0.5


@attrs.frozen(kw_only=True)
class DeviceView:
    """The ledger of one device as the planner sees it. ``capacity`` is what llmux
    may use: total minus the safety margin minus foreign use."""

    device: str
    capacity: int
    residents: tuple[Resident, ...] = ()

    @property
    def used(self) -> int:
        return sum(r.bytes for r in self.residents)

    @property
    def free(self) -> int:
        return self.capacity - self.used


@attrs.frozen
class Grant:
    model: str


@attrs.frozen
class Evict:
    victims: tuple[str, ...]
    reasons: tuple[str, ...]  # one sentence per victim, same order


@attrs.frozen
class Wait:
    reason: str


@attrs.frozen
class Refuse:
    reason: str


Decision = Grant | Evict | Wait | Refuse


def may_ever_evict(resident: Resident, want: Want, rules: Rules) -> bool:
    """Whether policy allows evicting ``resident`` for ``want`` at all."""
    if resident.pinned:
        return False
    return not (rules.strict_priority and resident.priority > want.priority)


def turn_over(resident: Resident, rules: Rules, now: float) -> bool:
    """Whether ``resident`` has had its turn while others waited: it is then evicted
    even if busy (it drains first) or with queued work."""
    if resident.turn_since is None:
        return False
    served = now - resident.turn_since
    if served >= rules.max_turn_wait_s:
        return True
    return (resident.turn_requests >= rules.max_turn_requests
            and served >= rules.turn_load_multiple * resident.load_s)


def _lingering(resident: Resident, rules: Rules, now: float) -> bool:
    """In its turn, a model keeps the device while it has queued work, and briefly
    after each request it served (its client's next one is likely on the way), also
    one it served just before its turn began.

    NOTE: the linger once counted only after a request of the turn: a model that had
    answered milliseconds before another began to wait was evicted at once, its
    client's next request then reloading it."""
    if resident.turn_since is None:
        return False
    return resident.queued > 0 or now - resident.last_used < rules.turn_linger_s


def may_evict_now(resident: Resident, rules: Rules, now: float) -> bool:
    """Whether ``resident`` can be told to unload right now."""
    if resident.residency is not Residency.LOADED:
        return False
    if turn_over(resident, rules, now):
        return True
    if resident.busy or _lingering(resident, rules, now):
        return False
    fresh = now - resident.loaded_at < rules.min_residency_s
    return not (fresh and resident.queued > 0)


def _why_not_now(resident: Resident, rules: Rules, now: float) -> str:
    if resident.residency is Residency.LOADING:
        return f"{resident.model} is still loading"
    if resident.turn_since is not None and (resident.busy or _lingering(resident, rules, now)):
        served = now - resident.turn_since
        if resident.turn_requests >= rules.max_turn_requests:
            floor = min(rules.turn_load_multiple * resident.load_s, rules.max_turn_wait_s)
            return (f"{resident.model} is serving its turn ({resident.turn_requests} "
                    f"requests; it lasts at least {rules.turn_load_multiple:g} times its "
                    f"{resident.load_s:.1f} s load, {floor - served:.1f} s left)")
        return (f"{resident.model} is serving its turn ({resident.turn_requests} of "
                f"{rules.max_turn_requests} requests, "
                f"{rules.max_turn_wait_s - served:.1f} s left)")
    if resident.busy:
        return f"{resident.model} is busy"
    left = rules.min_residency_s - (now - resident.loaded_at)
    return f"{resident.model} has queued work within its minimum residency ({left:.1f} s left)"


def _refusal(view: DeviceView, want: Want, keep: Sequence[Resident]) -> str:
    held = ", ".join(
        f"{r.model} ({'pinned' if r.pinned else r.klass}, {format_bytes(r.bytes)})" for r in keep
    )
    return (
        f"{want.model} ({want.klass}) needs {format_bytes(want.bytes)} but {view.device} can only "
        f"ever offer {format_bytes(view.capacity - sum(r.bytes for r in keep))}: "
        f"{held} may not be evicted for it"
    )


def eviction_order(candidates: Sequence[Resident], want: Want) -> list[Resident]:
    """Victim order: lower classes before higher ones, idle-now before busy within a
    class, least recently used first."""
    return sorted(
        candidates,
        key=lambda r: (r.priority > want.priority, r.priority, r.busy, r.last_used, r.model),
    )


def plan(view: DeviceView, want: Want, rules: Rules, now: float) -> Decision:
    """Decide what loading ``want`` on this device takes. Pure."""
    if want.bytes > view.capacity:
        return Refuse(
            f"{want.model} ({want.klass}) needs {format_bytes(want.bytes)} but {view.device} "
            f"offers at most {format_bytes(view.capacity)}"
        )
    if any(r.model == want.model for r in view.residents):
        return Wait(f"{want.model} is still in the ledger")

    active = [r for r in view.residents if r.residency in (Residency.LOADING, Residency.LOADED)]
    leaving = sum(r.bytes for r in view.residents if r not in active)
    for r in view.residents:
        if r not in active and want.group is not None and r.group == want.group:
            return Wait(f"waiting for {r.model} to leave exclusive group {want.group!r}")
    conflicts = [r for r in active if want.group is not None and r.group == want.group]
    keep = [r for r in active if not may_ever_evict(r, want, rules)]
    if any(r in keep for r in conflicts):
        blocker = next(r for r in conflicts if r in keep)
        return Refuse(
            f"{want.model} shares exclusive group {want.group!r} with {blocker.model}, "
            f"which may not be evicted for it"
        )
    if sum(r.bytes for r in keep) + want.bytes > view.capacity:
        return Refuse(_refusal(view, want, keep))

    victims = list(conflicts)
    shortfall = want.bytes - view.free - leaving - sum(v.bytes for v in victims)
    for candidate in eviction_order([r for r in active if r not in keep], want):
        if shortfall <= 0:
            break
        if candidate not in victims:
            victims.append(candidate)
            shortfall -= candidate.bytes

    if not victims:
        if want.bytes > view.free:
            return Wait(f"waiting for {format_bytes(leaving)} to be released on {view.device}")
        return Grant(want.model)
    blocked = [v for v in victims if not may_evict_now(v, rules, now)]
    if blocked:
        return Wait("; ".join(_why_not_now(v, rules, now) for v in blocked))
    free_text = format_bytes(max(view.free, 0))
    reasons = tuple(
        f"evicted {v.model} ({v.klass}) for {want.model} ({want.klass}): "
        + (
            f"exclusive group {want.group!r}"
            if v in conflicts
            else f"needed {format_bytes(want.bytes)}, free {free_text}"
        )
        + _turn_note(v, rules, now)
        for v in victims
    )
    return Evict(tuple(v.model for v in victims), reasons)


def _turn_note(victim: Resident, rules: Rules, now: float) -> str:
    if not (turn_over(victim, rules, now) and (victim.busy or victim.queued)):
        return ""
    after = ("it finishes its running request" if victim.busy
             else "its queued requests wait for its next load")
    return (f" (its turn is over after {victim.turn_requests} requests in "
            f"{now - (victim.turn_since or now):.1f} s; {after})")


def relieve(view: DeviceView, rules: Rules, now: float) -> Evict | Wait | None:
    """What to unload when the device holds more than its capacity (a model grew past
    its measured footprint, or a measurement came out above the estimate): unpinned
    models that may go now, in eviction order, until the excess is covered (those that
    may not go now are asked on a later plan). None: nothing to do
    (within capacity, or the excess is already being released). Pure."""
    excess = view.used - view.capacity
    leaving = sum(r.bytes for r in view.residents
                  if r.residency in (Residency.EVICTING, Residency.RELEASING))
    if excess <= 0 or excess <= leaving:
        return None
    excess -= leaving
    loaded = [r for r in view.residents if r.residency is Residency.LOADED and not r.pinned]
    order = sorted(loaded, key=lambda r: (r.priority, r.busy, r.last_used, r.model))
    victims: list[Resident] = []
    for candidate in order:
        if sum(v.bytes for v in victims) >= excess:
            break
        if may_evict_now(candidate, rules, now):
            victims.append(candidate)
    if not victims:  # what can go now goes now; the rest when it is idle
        return Wait(f"{view.device} is {format_bytes(excess)} over capacity and nothing can be "
                    "unloaded now")
    reasons = tuple(
        f"evicted {v.model} ({v.klass}): {view.device} holds {format_bytes(view.used)} of "
        f"{format_bytes(view.capacity)} after a model grew past its footprint"
        for v in victims
    )
    return Evict(tuple(v.model for v in victims), reasons)
