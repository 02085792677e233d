"""Moving a model between devices (the admin call behind GPU-vs-CPU checks), on a
runtime in this process with real fake-backend workers. No GPU here: the "cuda:0"
device is measured with the CPU probe, which is all the move needs."""

from __future__ import annotations

import anyio
import pytest

from llmux.actors.devices import CpuProbe
from llmux.actors.model_actor import State
from llmux.config import parse_config
from llmux.errors import BadRequest
from llmux.runtime import Runtime
from tests.conftest import fake_config, fake_model

pytestmark = pytest.mark.anyio


async def ask(runtime: Runtime) -> str:
    ticket = runtime.submit("m", "chat", {"messages": [{"role": "user", "content": "hi"}]})
    pieces, _ = await ticket.collect()
    return "".join(p.get("text", "") for p in pieces)


def ledger(runtime: Runtime, device: str) -> list[str]:
    return [entry["model"] for entry in runtime.arbiters[device].snapshot()["ledger"]]


async def test_a_model_moves_to_another_device_and_keeps_answering() -> None:
    config = parse_config({"devices": {"cpu": {"capacity": "1GB"},
                                       "cuda:0": {"capacity": "1GB"}},
                           **fake_config(m=fake_model())})
    runtime = Runtime(config, probes={"cpu": CpuProbe(), "cuda:0": CpuProbe()})
    actor = runtime.actors["m"]
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(runtime.run)
            assert await ask(runtime) == "echo: hi"
            assert ledger(runtime, "cpu") == ["m"]
            with pytest.raises(BadRequest, match=r"No device 'cuda:7'\. Devices: cpu, cuda:0"):
                runtime.move("m", "cuda:7")
            runtime.move("m", "cuda:0")
            # NOTE: polling: the actor's state has no event to wait on
            while not (actor.state is State.READY and actor.settings.device == "cuda:0"):  # noqa: ASYNC110
                await anyio.sleep(0.05)
            assert actor.settings.load_spec["device"] == "cuda:0"
            assert ledger(runtime, "cuda:0") == ["m"] and ledger(runtime, "cpu") == []
            assert await ask(runtime) == "echo: hi"
            assert actor.snapshot()["load_count"] == 2
            tg.cancel_scope.cancel()
