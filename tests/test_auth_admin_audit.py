"""What the admin and model routes answer and do, and what a key sees of the models,
beyond the status codes of ``test_auth_matrix``: from a mutation audit of
``llmux.auth``, ``llmux.http.auth``, ``llmux.http.admin`` and ``llmux.http.models``.

A live server over real sockets (its virtual names differ from its physical names, so a
reply that names the wrong one shows), one without keys, and the key store in-process.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from llmux.auth import ApiKey, KeyStore
from llmux.errors import Unauthorized
from tests.conftest import Server, fake_model, live_workers, serving, wait_until

ADMIN_KEY = "sk-audit-admin-7d1f0b3c9e"
FULL_KEY = "sk-audit-full-4a8e2c6d1b"
NARROW_KEY = "sk-audit-narrow-9c3b5e7f2a"
KEYS = {"keys": [
    {"name": "audit-admin", "key": ADMIN_KEY, "admin": True},
    {"name": "audit-full", "key": FULL_KEY},
    # "ghost" is not a configured model: the key names it anyway (a stale keys file).
    {"name": "audit-narrow", "key": NARROW_KEY, "models": ["spare", "ghost"]},
]}

CONFIG: dict[str, Any] = {
    "devices": {"cpu": {"capacity": "4GB"}},
    # Not in sorted order, and no physical name is a virtual one.
    "physical_models": {
        "zeta": fake_model(),
        "chat-llm": fake_model(reply="hello"),
        "embedder": fake_model(embedding_dim=4) | {"type": "embedding"},
    },
    "virtual_models": {"chat": {"physical": "chat-llm"}, "embed": {"physical": "embedder"},
                       "spare": {"physical": "zeta"}},
}

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
FULL = {"Authorization": f"Bearer {FULL_KEY}"}
NARROW = {"Authorization": f"Bearer {NARROW_KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(json.loads(json.dumps(CONFIG)), tmp_path_factory.mktemp("auth_admin_audit"),
                 keys=KEYS, admin_key=ADMIN_KEY) as server:
        yield server


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def error_of(reply: httpx.Response, status: int) -> dict[str, Any]:
    assert reply.status_code == status, reply.text
    error: dict[str, Any] = reply.json()["error"]
    return error


def loaded(client: httpx.Client, model: str) -> bool:
    """What ``/v1/models/{model}`` says of it."""
    reply = client.get(f"/v1/models/{model}", headers=FULL)
    assert reply.status_code == 200, reply.text
    answer: bool = reply.json()["llmux"]["loaded"]
    return answer


# -- /admin/models ---------------------------------------------------------------------


def test_load_move_and_unload_name_the_physical_model_and_are_done(
        server: Server, client: httpx.Client) -> None:
    """Each admin call on a virtual name answers 202 naming its physical model, and the
    actor does it: /v1/models and /health follow the model's state."""
    assert client.get("/health").json()["loaded"] == []
    assert loaded(client, "chat") is False

    reply = client.post("/admin/models/chat/load", headers=ADMIN)
    assert reply.status_code == 202, reply.text
    assert reply.json() == {"model": "chat-llm", "action": "load", "accepted": True}
    wait_until(lambda: server.model("chat-llm")["state"] == "ready", 30, "chat-llm to load")
    assert loaded(client, "chat") is True
    assert loaded(client, "embed") is False
    assert client.get("/health").json() == {"status": "ok", "loaded": ["chat-llm"],
                                            "failed": []}

    reply = client.post("/admin/models/chat/device", headers=ADMIN, json={"device": "cpu"})
    assert reply.status_code == 202, reply.text
    assert reply.json() == {"model": "chat-llm", "action": "move", "device": "cpu",
                            "accepted": True}
    # A move unloads the model and loads it again there, even on the same device.
    wait_until(lambda: (m := server.model("chat-llm"))["load_count"] == 2
               and m["state"] == "ready", 30, "chat-llm to be loaded again")

    reply = client.post("/admin/models/chat/unload", headers=ADMIN)
    assert reply.status_code == 202, reply.text
    assert reply.json() == {"model": "chat-llm", "action": "unload", "accepted": True}
    wait_until(lambda: client.get("/health").json()["loaded"] == [], 30, "chat-llm to unload")
    assert loaded(client, "chat") is False


def test_a_move_without_a_device_is_a_400_naming_the_field(client: httpx.Client) -> None:
    for body in ({}, {"device": None}):
        error = error_of(client.post("/admin/models/chat/device", headers=ADMIN, json=body),
                         400)
        assert error["param"] == "device", error


def test_an_unknown_physical_model_is_a_404_listing_them_sorted(client: httpx.Client) -> None:
    for action in ("load", "unload"):
        error = error_of(client.post(f"/admin/models/nope/{action}", headers=ADMIN), 404)
        assert error["message"] == \
            "No physical model 'nope'. Physical models: chat-llm, embedder, zeta"


# -- /v1/models ------------------------------------------------------------------------


def test_the_list_is_openai_s_with_each_model_s_own_type_and_backend(
        client: httpx.Client) -> None:
    reply = client.get("/v1/models", headers=FULL)
    assert reply.status_code == 200, reply.text
    listed = reply.json()
    assert listed["object"] == "list"
    models = {m["id"]: m for m in listed["data"]}
    assert list(models) == ["chat", "embed", "spare"]
    assert models["embed"]["object"] == "model"
    assert models["embed"]["llmux"] | {"loaded": None} == {
        "type": "embedding", "physical_model": "embedder", "backend": "fake",
        "loaded": None, "capabilities": []}
    assert models["chat"]["llmux"]["type"] == "llm"
    assert client.get("/v1/models/embed", headers=FULL).json() == models["embed"]


def test_a_key_naming_a_model_that_is_not_configured_sees_only_its_real_ones(
        client: httpx.Client) -> None:
    """A 404 for a name the key lists but the config lacks still lists only the models
    the key may use, like any other unknown name."""
    listed = client.get("/v1/models", headers=NARROW).json()["data"]
    assert [m["id"] for m in listed] == ["spare"]
    for name in ("ghost", "chat", "nope"):
        error = error_of(client.get(f"/v1/models/{name}", headers=NARROW), 404)
        assert error["message"] == \
            f"The model '{name}' does not exist. Available models: spare", error


# -- what needs a key --------------------------------------------------------------------


def test_an_unknown_route_is_a_404_with_or_without_a_key(client: httpx.Client) -> None:
    """No route runs for an unknown path, so none needs a key: it is 404 for anyone."""
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, FULL):
        error = error_of(client.get("/v1/nothing", headers=headers), 404)
        assert "No route" in error["message"], error


# -- the key store ---------------------------------------------------------------------


def test_an_undecodable_byte_does_not_match_a_key_with_a_question_mark(tmp_path: Path
                                                                         ) -> None:
    """A lone surrogate (a byte that was not UTF-8) hashes as itself: it is neither
    turned into '?' nor dropped, which would make it another key of the file."""
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump({"keys": [{"name": "q", "key": "plain-secret-?"},
                                             {"name": "r", "key": "plain-secret-"}]}))
    keys = KeyStore(path)
    assert keys.authenticate("Bearer plain-secret-?") is not None
    for byte in (b"\xff", b"\x80", b"\xc3"):
        header = (b"Bearer plain-secret-" + byte).decode("utf-8", "surrogateescape")
        with pytest.raises(Unauthorized):
            keys.authenticate(header)


def test_an_edit_to_no_keys_refuses_everyone(tmp_path: Path) -> None:
    """``keys: []`` is a valid edit: it takes effect like any other (all keys revoked),
    it does not keep the old keys as a broken file does."""
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump({"keys": [{"name": "a", "key": "a-key"}]}))
    keys = KeyStore(path)
    assert keys.authenticate("Bearer a-key") is not None
    path.write_text(yaml.safe_dump({"keys": []}))
    assert keys.reload_if_changed() is True
    assert keys.keys == ()
    with pytest.raises(Unauthorized):
        keys.authenticate("Bearer a-key")


def test_a_key_made_from_a_plain_key_keeps_its_role_and_models() -> None:
    key = ApiKey.from_key("ops", "k", models=["chat"], admin=True)
    assert (key.admin, key.models) == (True, ("chat",))
    assert ApiKey.from_key("user", "k").admin is False


def test_without_keys_the_list_and_each_model_are_open_to_anyone(tmp_path: Path) -> None:
    """A server without a keys file lists every model to a caller without a key."""
    server = Server(json.loads(json.dumps(CONFIG)), tmp_path)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as anyone:
            listed = anyone.get("/v1/models").json()["data"]
            assert [m["id"] for m in listed] == ["chat", "embed", "spare"]
            assert anyone.get("/v1/models/spare").json()["id"] == "spare"
    finally:
        server.stop()
        wait_until(lambda: not live_workers(), 15, "workers to exit")
