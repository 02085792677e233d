"""What the guarantee tests share: clients and small readings of a live server."""

from __future__ import annotations

from typing import Any

import httpx

from tests.conftest import Server


def chat(server: Server, model: str, text: str = "hi", timeout: float = 60,
         **extra: Any) -> httpx.Response:
    """One non-streaming chat request."""
    return httpx.post(f"{server.url}/v1/chat/completions", timeout=timeout, json={
        "model": model, "messages": [{"role": "user", "content": text}], **extra})


def loads(server: Server) -> dict[str, int]:
    """How many times each physical model has loaded."""
    return {m["id"]: m["load_count"] for m in server.state()["models"]}


def events(server: Server, kind: str | None = None) -> list[dict[str, Any]]:
    """The server's recent events, oldest first, of one kind or all."""
    found: list[dict[str, Any]] = server.state()["events"]
    return [e for e in found if kind is None or e["kind"] == kind]


def transitions_to(server: Server, model: str, state: str) -> int:
    return sum(1 for e in events(server, "transition")
               if e["model"] == model and e["to_state"] == state)
