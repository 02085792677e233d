"""The placement policy on the seed deployment (kischdle-5070ti.yaml), with its
estimates on a 16 GB budget: one test per scenario, exact decisions."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from llmux.actors.placement import (
    DeviceView,
    Evict,
    Grant,
    Refuse,
    Residency,
    Resident,
    Rules,
    Wait,
    Want,
    eviction_order,
    plan,
    relieve,
)
from llmux.config import Config, load_config

CONFIG = Path(__file__).parent.parent / "config" / "kischdle-5070ti.yaml"
BUDGET = 16_000_000_000
NOW = 1000.0


@pytest.fixture(scope="module")
def seed() -> Config:
    return load_config(CONFIG)


def want(seed: Config, model: str) -> Want:
    m = seed.physical_models[model]
    return Want(model=model, klass=m.priority_class or m.type, priority=m.priority(seed.policy),
                bytes=m.estimated_vram, group=m.exclusive_group)


def resident(seed: Config, model: str, **kw: object) -> Resident:
    m = seed.physical_models[model]
    fields: dict[str, object] = dict(
        model=model, klass=m.priority_class or m.type, priority=m.priority(seed.policy),
        bytes=m.estimated_vram, group=m.exclusive_group, pinned=m.pinned,
        loaded_at=0.0, last_used=0.0,
    )
    fields.update(kw)
    return Resident(**fields)  # type: ignore[arg-type]


def view(seed: Config, *residents: Resident, capacity: int = BUDGET) -> DeviceView:
    return DeviceView(device="cuda:0", capacity=capacity, residents=residents)


RULES = Rules(strict_priority=False, min_residency_s=10.0)
STRICT = Rules(strict_priority=True, min_residency_s=10.0)


# --- typical scenarios of the seed deployment ------------------------------------------


def test_cold_start_chat_is_granted(seed: Config) -> None:
    assert plan(view(seed), want(seed, "qwen3.5-9b-fp8"), RULES, NOW) == Grant("qwen3.5-9b-fp8")


def test_dictation_loads_beside_a_9b_chat_model(seed: Config) -> None:
    decision = plan(view(seed, resident(seed, "qwen3.5-9b-fp8")),
                    want(seed, "cohere-transcribe"), RULES, NOW)
    assert decision == Grant("cohere-transcribe")


def test_read_aloud_loads_beside_chat_and_dictation(seed: Config) -> None:
    v = view(seed, resident(seed, "qwen3.5-9b-fp8"), resident(seed, "cohere-transcribe"))
    assert plan(v, want(seed, "chatterbox-turbo"), RULES, NOW) == Grant("chatterbox-turbo")


def test_switching_llm_evicts_the_other_llm_by_exclusive_group(seed: Config) -> None:
    v = view(seed, resident(seed, "qwen3.5-9b-fp8"), resident(seed, "cohere-transcribe"),
             resident(seed, "chatterbox-turbo"))
    decision = plan(v, want(seed, "qwen3.5-4b"), RULES, NOW)
    assert decision == Evict(
        ("qwen3.5-9b-fp8",),
        ("evicted qwen3.5-9b-fp8 (llm) for qwen3.5-4b (llm): exclusive group 'llm'",),
    )


def test_switching_tts_variant_evicts_the_other_tts(seed: Config) -> None:
    v = view(seed, resident(seed, "chatterbox-turbo"))
    decision = plan(v, want(seed, "chatterbox-multilingual"), RULES, NOW)
    assert isinstance(decision, Evict)
    assert decision.victims == ("chatterbox-turbo",)


def test_gpt_oss_evicts_llm_then_tts_then_asr_as_last_resort(seed: Config) -> None:
    v = view(seed, resident(seed, "qwen3.5-9b-fp8", last_used=5.0),
             resident(seed, "cohere-transcribe", last_used=1.0),
             resident(seed, "chatterbox-turbo", last_used=2.0))
    decision = plan(v, want(seed, "gpt-oss-20b"), RULES, NOW)
    assert isinstance(decision, Evict)
    assert decision.victims == ("qwen3.5-9b-fp8", "chatterbox-turbo", "cohere-transcribe")


def test_gpt_oss_with_tts_fits_after_evicting_the_llm_only(seed: Config) -> None:
    v = view(seed, resident(seed, "qwen3.5-4b"), resident(seed, "chatterbox"))
    decision = plan(v, want(seed, "gpt-oss-20b"), RULES, NOW)
    assert isinstance(decision, Evict)
    assert decision.victims == ("qwen3.5-4b",)


def test_strict_priority_refuses_gpt_oss_beside_asr_at_once(seed: Config) -> None:
    v = view(seed, resident(seed, "cohere-transcribe"))
    decision = plan(v, want(seed, "gpt-oss-20b"), STRICT, NOW)
    assert decision == Refuse(
        "gpt-oss-20b (llm) needs 13.0 GB but cuda:0 can only ever offer 12.0 GB: "
        "cohere-transcribe (asr, 4.0 GB) may not be evicted for it"
    )


def test_asr_evicts_the_llm_before_the_tts(seed: Config) -> None:
    v = view(seed, resident(seed, "gpt-oss-20b", last_used=9.0),
             resident(seed, "chatterbox", last_used=1.0))
    decision = plan(v, want(seed, "cohere-transcribe"), RULES, NOW)
    assert decision == Evict(
        ("gpt-oss-20b",),
        ("evicted gpt-oss-20b (llm) for cohere-transcribe (asr): needed 4.0 GB, free 1.0 GB",),
    )


def test_busy_model_is_not_evicted_the_requester_waits(seed: Config) -> None:
    v = view(seed, resident(seed, "gpt-oss-20b", busy=True), resident(seed, "chatterbox"))
    decision = plan(v, want(seed, "cohere-transcribe"), RULES, NOW)
    assert decision == Wait("gpt-oss-20b is busy")


def test_an_idle_victim_of_the_same_class_is_preferred_to_a_busy_one(seed: Config) -> None:
    v = view(seed, resident(seed, "qwen3.5-9b-fp8", busy=True, last_used=0.0),
             resident(seed, "chatterbox", last_used=5.0), capacity=12_000_000_000)
    decision = plan(v, want(seed, "chatterbox-turbo"), RULES, NOW)
    assert isinstance(decision, Evict) and decision.victims == ("chatterbox",)


def test_fresh_model_with_queued_work_keeps_its_residency(seed: Config) -> None:
    v = view(seed, resident(seed, "qwen3.5-9b-fp8", loaded_at=NOW - 3, queued=2))
    decision = plan(v, want(seed, "gpt-oss-20b"), RULES, NOW)
    assert decision == Wait(
        "qwen3.5-9b-fp8 has queued work within its minimum residency (7.0 s left)"
    )


def test_fresh_model_without_queued_work_may_be_evicted(seed: Config) -> None:
    v = view(seed, resident(seed, "qwen3.5-9b-fp8", loaded_at=NOW - 3, queued=0))
    assert isinstance(plan(v, want(seed, "gpt-oss-20b"), RULES, NOW), Evict)


def test_model_bigger_than_the_device_is_refused(seed: Config) -> None:
    decision = plan(view(seed, capacity=8_000_000_000), want(seed, "qwen3.5-9b-fp8"), RULES, NOW)
    assert decision == Refuse("qwen3.5-9b-fp8 (llm) needs 9.0 GB but cuda:0 offers at most 8.0 GB")


def test_pinned_model_is_never_evicted(seed: Config) -> None:
    v = view(seed, resident(seed, "qwen3.5-9b-fp8", pinned=True),
             resident(seed, "cohere-transcribe"))
    decision = plan(v, want(seed, "gpt-oss-20b"), RULES, NOW)
    assert isinstance(decision, Refuse)
    assert "qwen3.5-9b-fp8" in decision.reason


def test_pinned_group_member_refuses_its_rival(seed: Config) -> None:
    v = view(seed, resident(seed, "qwen3.5-4b", pinned=True))
    decision = plan(v, want(seed, "qwen3.5-9b-fp8"), RULES, NOW)
    assert decision == Refuse(
        "qwen3.5-9b-fp8 shares exclusive group 'llm' with qwen3.5-4b, "
        "which may not be evicted for it"
    )


def test_memory_being_released_is_waited_for_not_evicted_again(seed: Config) -> None:
    v = view(seed, resident(seed, "gpt-oss-20b", residency=Residency.EVICTING),
             resident(seed, "chatterbox"))
    decision = plan(v, want(seed, "cohere-transcribe"), RULES, NOW)
    assert decision == Wait("waiting for 13.0 GB to be released on cuda:0")


def test_a_loading_model_is_not_evicted(seed: Config) -> None:
    v = view(seed, resident(seed, "gpt-oss-20b", residency=Residency.LOADING))
    decision = plan(v, want(seed, "cohere-transcribe"), RULES, NOW)
    assert decision == Wait("gpt-oss-20b is still loading")


# --- VRAM accounting ---------------------------------------------------------------------


def test_all_tts_and_asr_and_a_small_llm_fit_together(seed: Config) -> None:
    v = view(seed, resident(seed, "qwen3.5-4b"), resident(seed, "cohere-transcribe"))
    assert plan(v, want(seed, "chatterbox"), RULES, NOW) == Grant("chatterbox")


def test_measured_footprint_decides_not_the_estimate(seed: Config) -> None:
    v = view(seed, resident(seed, "qwen3.5-9b-fp8", bytes=11_500_000_000),
             resident(seed, "cohere-transcribe"))
    decision = plan(v, want(seed, "chatterbox"), RULES, NOW)
    assert isinstance(decision, Evict) and decision.victims == ("qwen3.5-9b-fp8",)


def test_a_safety_margin_shrinks_what_fits(seed: Config) -> None:
    residents = (resident(seed, "qwen3.5-9b-fp8"), resident(seed, "cohere-transcribe"))
    tight = DeviceView(device="cuda:0", capacity=BUDGET - 1_536_000_000, residents=residents)
    decision = plan(tight, want(seed, "chatterbox"), RULES, NOW)
    assert isinstance(decision, Evict) and decision.victims == ("qwen3.5-9b-fp8",)


def test_eviction_order_is_class_then_least_recently_used(seed: Config) -> None:
    order = eviction_order([
        resident(seed, "chatterbox", last_used=1.0),
        resident(seed, "qwen3.5-4b", last_used=9.0),
        resident(seed, "cohere-transcribe", last_used=0.0),
        resident(seed, "qwen3.5-9b-fp8", last_used=3.0),
    ], want(seed, "chatterbox-turbo"))
    assert [r.model for r in order] == [
        "qwen3.5-9b-fp8", "qwen3.5-4b", "chatterbox", "cohere-transcribe"]


# --- turns: the loaded model's queue first, up to a bound (guarantee 2) -----------------

TURNS = Rules(strict_priority=False, min_residency_s=10.0, max_turn_requests=8,
              max_turn_wait_s=30.0, turn_linger_s=0.5)


def in_turn(seed: Config, model: str, **kw: object) -> Resident:
    """A model loaded long ago whose turn began at NOW - 5 (others wait since)."""
    fields: dict[str, object] = dict(turn_since=NOW - 5, loaded_at=NOW - 100)
    fields.update(kw)
    return resident(seed, model, **fields)


def test_a_busy_model_in_its_turn_keeps_the_device(seed: Config) -> None:
    v = view(seed, in_turn(seed, "qwen3.5-9b-fp8", busy=True, turn_requests=3, queued=2))
    assert plan(v, want(seed, "qwen3.5-4b"), TURNS, NOW) == Wait(
        "qwen3.5-9b-fp8 is serving its turn (3 of 8 requests, 25.0 s left)")


def test_a_model_that_served_in_its_turn_lingers_for_its_clients_next_request(
    seed: Config,
) -> None:
    v = view(seed, in_turn(seed, "qwen3.5-9b-fp8", turn_requests=3, last_used=NOW - 0.2))
    assert isinstance(plan(v, want(seed, "qwen3.5-4b"), TURNS, NOW), Wait)


def test_the_linger_ends_half_a_second_after_the_last_request(seed: Config) -> None:
    v = view(seed, in_turn(seed, "qwen3.5-9b-fp8", turn_requests=3, last_used=NOW - 0.6))
    assert isinstance(plan(v, want(seed, "qwen3.5-4b"), TURNS, NOW), Evict)


def test_an_idle_model_that_served_nothing_in_its_turn_goes_at_once(seed: Config) -> None:
    v = view(seed, in_turn(seed, "qwen3.5-9b-fp8", turn_requests=0, last_used=NOW - 6))
    assert isinstance(plan(v, want(seed, "qwen3.5-4b"), TURNS, NOW), Evict)


def test_a_model_that_answered_just_before_its_turn_began_lingers(seed: Config) -> None:
    # Others began to wait 10 ms after its last answer: its client's next request is
    # likely on the way (it was once evicted at once, then reloaded for that request).
    v = view(seed, in_turn(seed, "qwen3.5-9b-fp8", turn_since=NOW, turn_requests=0,
                           last_used=NOW - 0.01))
    assert isinstance(plan(v, want(seed, "qwen3.5-4b"), TURNS, NOW), Wait)
    assert isinstance(plan(v, want(seed, "qwen3.5-4b"), TURNS, NOW + 0.5), Evict)


def test_after_max_turn_requests_a_busy_model_is_evicted_and_drains(seed: Config) -> None:
    v = view(seed, in_turn(seed, "qwen3.5-9b-fp8", busy=True, turn_requests=8, queued=5))
    assert plan(v, want(seed, "qwen3.5-4b"), TURNS, NOW) == Evict(
        ("qwen3.5-9b-fp8",),
        ("evicted qwen3.5-9b-fp8 (llm) for qwen3.5-4b (llm): exclusive group 'llm' (its turn "
         "is over after 8 requests in 5.0 s; it finishes its running request)",),
    )


FLOORED = attrs.evolve(TURNS, turn_load_multiple=10.0)


def test_a_turn_lasts_at_least_a_multiple_of_the_models_load_time(seed: Config) -> None:
    # 8 requests in its 5 s turn, but its load took 2 s: the turn lasts 20 s.
    slow = in_turn(seed, "qwen3.5-9b-fp8", busy=True, turn_requests=8, queued=5, load_s=2.0)
    assert plan(view(seed, slow), want(seed, "qwen3.5-4b"), FLOORED, NOW) == Wait(
        "qwen3.5-9b-fp8 is serving its turn (8 requests; it lasts at least 10 times its "
        "2.0 s load, 15.0 s left)")
    assert isinstance(plan(view(seed, slow), want(seed, "qwen3.5-4b"), FLOORED, NOW + 15),
                      Evict)
    fast = attrs.evolve(slow, load_s=0.4)  # a 4 s floor, already served
    assert isinstance(plan(view(seed, fast), want(seed, "qwen3.5-4b"), FLOORED, NOW), Evict)


def test_the_load_time_floor_never_outlasts_max_turn_wait(seed: Config) -> None:
    slow = in_turn(seed, "qwen3.5-9b-fp8", busy=True, turn_requests=8, load_s=60.0,
                   turn_since=NOW - 30)
    assert isinstance(plan(view(seed, slow), want(seed, "qwen3.5-4b"), FLOORED, NOW), Evict)
    fewer = attrs.evolve(slow, turn_requests=2)
    assert isinstance(plan(view(seed, fewer), want(seed, "qwen3.5-4b"), FLOORED, NOW), Evict)


def test_after_max_turn_wait_a_busy_model_is_evicted(seed: Config) -> None:
    v = view(seed, in_turn(seed, "qwen3.5-9b-fp8", busy=True, turn_requests=2,
                           turn_since=NOW - 30))
    assert isinstance(plan(v, want(seed, "qwen3.5-4b"), TURNS, NOW), Evict)


def test_a_turn_over_overrides_the_minimum_residency(seed: Config) -> None:
    v = view(seed, in_turn(seed, "qwen3.5-9b-fp8", loaded_at=NOW - 1, queued=3,
                           turn_requests=8))
    assert isinstance(plan(v, want(seed, "qwen3.5-4b"), TURNS, NOW), Evict)


def test_without_a_turn_a_busy_model_is_never_evicted(seed: Config) -> None:
    v = view(seed, resident(seed, "qwen3.5-9b-fp8", busy=True, queued=50))
    assert plan(v, want(seed, "qwen3.5-4b"), TURNS, NOW + 1e6) == Wait("qwen3.5-9b-fp8 is busy")


def test_a_turn_never_makes_a_pinned_model_evictable(seed: Config) -> None:
    v = view(seed, in_turn(seed, "qwen3.5-9b-fp8", pinned=True, turn_requests=99))
    assert isinstance(plan(v, want(seed, "qwen3.5-4b"), TURNS, NOW), Refuse)


# --- relieve: a device over capacity after a model grew ---------------------------------


def test_a_device_within_capacity_needs_no_relief(seed: Config) -> None:
    assert relieve(view(seed, resident(seed, "qwen3.5-9b-fp8")), TURNS, NOW) is None


def test_a_grown_model_sheds_the_lowest_class_least_recently_used_first(seed: Config) -> None:
    v = view(seed, resident(seed, "qwen3.5-9b-fp8", bytes=12_500_000_000, last_used=5.0),
             resident(seed, "chatterbox", last_used=1.0),
             resident(seed, "cohere-transcribe", last_used=0.0))
    decision = relieve(v, TURNS, NOW)
    assert isinstance(decision, Evict) and decision.victims == ("qwen3.5-9b-fp8",)
    assert decision.reasons[0] == (
        "evicted qwen3.5-9b-fp8 (llm): cuda:0 holds 18.5 GB of 16.0 GB after a model grew "
        "past its footprint")


def test_relief_skips_busy_and_pinned_models(seed: Config) -> None:
    v = view(seed, resident(seed, "qwen3.5-9b-fp8", bytes=12_500_000_000, busy=True),
             resident(seed, "chatterbox", pinned=True),
             resident(seed, "cohere-transcribe"))
    decision = relieve(v, TURNS, NOW)
    assert isinstance(decision, Evict) and decision.victims == ("cohere-transcribe",)


def test_relief_waits_when_nothing_may_go_now(seed: Config) -> None:
    v = view(seed, resident(seed, "qwen3.5-9b-fp8", bytes=17_000_000_000, busy=True))
    assert relieve(v, TURNS, NOW) == Wait(
        "cuda:0 is 1.0 GB over capacity and nothing can be unloaded now")


def test_relief_already_on_its_way_is_not_asked_again(seed: Config) -> None:
    v = view(seed, resident(seed, "qwen3.5-9b-fp8", bytes=12_500_000_000),
             resident(seed, "cohere-transcribe", residency=Residency.EVICTING))
    assert relieve(v, TURNS, NOW) is None


# --- boundaries and rules the scenarios above leave open (found by mutation testing) ----


def test_strict_priority_still_evicts_a_model_of_the_same_class(seed: Config) -> None:
    # Only a *higher* class is spared under strict priority: an equal one is fair game.
    v = view(seed, resident(seed, "qwen3.5-9b-fp8"))
    decision = plan(v, want(seed, "qwen3.5-4b"), STRICT, NOW)
    assert isinstance(decision, Evict) and decision.victims == ("qwen3.5-9b-fp8",)


def test_a_model_exactly_as_big_as_the_device_is_granted(seed: Config) -> None:
    assert plan(view(seed, capacity=9_000_000_000), want(seed, "qwen3.5-9b-fp8"), RULES,
                NOW) == Grant("qwen3.5-9b-fp8")


def test_what_may_not_be_evicted_plus_the_model_may_fill_the_device_exactly(
    seed: Config,
) -> None:
    v = view(seed, resident(seed, "cohere-transcribe", pinned=True),
             resident(seed, "chatterbox"), capacity=6_000_000_000)
    decision = plan(v, want(seed, "chatterbox-turbo"), RULES, NOW)
    assert isinstance(decision, Evict) and decision.victims == ("chatterbox",)


def test_a_model_still_leaving_the_ledger_is_not_planned_again(seed: Config) -> None:
    # Its old bytes are still counted: a second entry for it would count them twice.
    v = view(seed, resident(seed, "chatterbox", residency=Residency.EVICTING))
    assert plan(v, want(seed, "chatterbox"), RULES, NOW) == Wait(
        "chatterbox is still in the ledger")


def test_a_rival_still_leaving_the_exclusive_group_is_waited_for(seed: Config) -> None:
    # There is room, but the group holds at most one model, also while one leaves.
    v = view(seed, resident(seed, "qwen3.5-4b", residency=Residency.RELEASING))
    assert plan(v, want(seed, "chatterbox"), RULES, NOW) == Grant("chatterbox")
    assert plan(v, want(seed, "qwen3.5-9b-fp8"), RULES, NOW) == Wait(
        "waiting for qwen3.5-4b to leave exclusive group 'llm'")


def test_eviction_stops_once_the_shortfall_is_exactly_covered(seed: Config) -> None:
    # 2 GB free of 17: gpt-oss needs 13 = 2 free + 9 (its group's llm) + 2, which the tts
    # covers exactly, so the asr model stays.
    v = view(seed, resident(seed, "qwen3.5-9b-fp8", last_used=1.0),
             resident(seed, "cohere-transcribe", last_used=0.0),
             resident(seed, "chatterbox", last_used=0.0), capacity=17_000_000_000)
    decision = plan(v, want(seed, "gpt-oss-20b"), RULES, NOW)
    assert isinstance(decision, Evict)
    assert decision.victims == ("qwen3.5-9b-fp8", "chatterbox")


def test_any_victim_that_may_not_go_now_makes_the_requester_wait(seed: Config) -> None:
    # The llm (its group) may go, but the busy tts is needed too: nothing is evicted yet.
    v = view(seed, resident(seed, "qwen3.5-4b"), resident(seed, "chatterbox", busy=True),
             resident(seed, "cohere-transcribe"))
    assert plan(v, want(seed, "gpt-oss-20b"), RULES, NOW) == Wait("chatterbox is busy")


def test_a_model_with_queued_work_keeps_the_device_in_its_turn(seed: Config) -> None:
    # Idle this instant, last used long ago, but its queue waits: the turn is not over.
    v = view(seed, in_turn(seed, "qwen3.5-9b-fp8", turn_requests=3, queued=2,
                           last_used=NOW - 5))
    assert plan(v, want(seed, "qwen3.5-4b"), TURNS, NOW) == Wait(
        "qwen3.5-9b-fp8 is serving its turn (3 of 8 requests, 25.0 s left)")


def test_the_linger_is_over_exactly_turn_linger_s_after_the_last_request(seed: Config) -> None:
    v = view(seed, in_turn(seed, "qwen3.5-9b-fp8", turn_requests=3, last_used=NOW - 0.5))
    assert isinstance(plan(v, want(seed, "qwen3.5-4b"), TURNS, NOW), Evict)


def test_the_minimum_residency_is_over_exactly_min_residency_s_after_the_load(
    seed: Config,
) -> None:
    v = view(seed, resident(seed, "qwen3.5-9b-fp8", loaded_at=NOW - 10, queued=2))
    assert isinstance(plan(v, want(seed, "gpt-oss-20b"), RULES, NOW), Evict)


def test_a_victim_whose_turn_is_over_with_queued_work_is_told_why(seed: Config) -> None:
    v = view(seed, in_turn(seed, "qwen3.5-9b-fp8", queued=3, turn_requests=8))
    decision = plan(v, want(seed, "qwen3.5-4b"), TURNS, NOW)
    assert isinstance(decision, Evict)
    assert decision.reasons[0].endswith(
        "(its turn is over after 8 requests in 5.0 s; its queued requests wait for its "
        "next load)")


def test_an_over_full_device_reports_no_negative_free_memory(seed: Config) -> None:
    v = view(seed, resident(seed, "qwen3.5-9b-fp8", bytes=17_000_000_000))
    decision = plan(v, want(seed, "cohere-transcribe"), RULES, NOW)
    assert isinstance(decision, Evict)
    assert decision.reasons[0].endswith("needed 4.0 GB, free 0 B")


def test_relief_counts_what_is_already_leaving(seed: Config) -> None:
    # 3 GB over, 2 GB of it already on its way out: one 2 GB tts covers the rest.
    v = view(seed, resident(seed, "qwen3.5-9b-fp8", bytes=13_000_000_000, pinned=True),
             resident(seed, "chatterbox", last_used=0.0),
             resident(seed, "chatterbox-turbo", last_used=1.0),
             resident(seed, "chatterbox-multilingual", residency=Residency.EVICTING))
    decision = relieve(v, TURNS, NOW)
    assert isinstance(decision, Evict) and decision.victims == ("chatterbox",)


def test_relief_exactly_covered_by_what_is_leaving_needs_nothing(seed: Config) -> None:
    # 2 GB over, and the 2 GB tts on its way out: nothing more to do, and nothing to wait for.
    v = view(seed, resident(seed, "qwen3.5-9b-fp8", bytes=16_000_000_000),
             resident(seed, "chatterbox", residency=Residency.RELEASING))
    assert relieve(v, TURNS, NOW) is None


def test_relief_sheds_the_least_recently_used_of_a_class_and_stops_when_covered(
    seed: Config,
) -> None:
    # 2 GB over: the older tts covers it exactly; the newer one stays.
    v = view(seed, resident(seed, "qwen3.5-9b-fp8", bytes=14_000_000_000, pinned=True),
             resident(seed, "chatterbox", last_used=5.0),
             resident(seed, "chatterbox-turbo", last_used=2.0))
    decision = relieve(v, TURNS, NOW)
    assert isinstance(decision, Evict) and decision.victims == ("chatterbox-turbo",)
