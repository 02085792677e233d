"""The API key store: bearer keys in, named keys out; every file mistake named by path."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import assume, given
from hypothesis import strategies as st

from llmux.auth import RELOAD_INTERVAL_S, ApiKey, KeyStore, load_keys, parse_keys
from llmux.config import ConfigError
from llmux.errors import Unauthorized

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "api_keys.example.yaml"

MISSING = "Send your API key as 'Authorization: Bearer <key>'."
WRONG_SCHEME = "The Authorization header must use the Bearer scheme: 'Authorization: Bearer <key>'."
NO_KEY = "The Authorization header has no key after 'Bearer'."
SPACES = "The Authorization header must be 'Bearer <key>', with no spaces in the key."
INVALID = "The API key is not valid."


def sha(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


class FakeClock:
    """Monotonic seconds that only move when a test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def write(path: Path, *entries: dict[str, Any]) -> Path:
    """Write a keys file and move its mtime on, so a rewrite is always seen as a change."""
    previous = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(yaml.safe_dump({"keys": list(entries)}), encoding="utf-8")
    bumped = max(previous + 1_000_000_000, path.stat().st_mtime_ns)
    os.utime(path, ns=(bumped, bumped))
    return path


def store(path: Path, *entries: dict[str, Any], clock: FakeClock | None = None) -> KeyStore:
    return KeyStore(write(path, *entries), clock=clock or FakeClock())


def refusal(keys: KeyStore, header: str | None) -> str:
    with pytest.raises(Unauthorized) as caught:
        keys.authenticate(header)
    return caught.value.message


def problems_of(data: object) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_keys(data, "keys.yaml")
    assert caught.value.source == "keys.yaml"
    return caught.value.problems


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    return tmp_path / "api_keys.yaml"


@pytest.fixture
def two_keys(keys_file: Path) -> KeyStore:
    return store(
        keys_file,
        {"name": "plain", "key": "plain-secret-1"},
        {"name": "hashed", "key": sha("hashed-secret-2"), "models": ["Qwen"]},
    )


# --- authenticate ------------------------------------------------------------------------


def test_plain_key_authenticates(two_keys: KeyStore) -> None:
    key = two_keys.authenticate("Bearer plain-secret-1")
    assert key is not None and key.name == "plain"


def test_sha256_key_authenticates(two_keys: KeyStore) -> None:
    key = two_keys.authenticate("Bearer hashed-secret-2")
    assert key is not None and key.name == "hashed"
    assert key.models == ("Qwen",)


def test_sha256_digest_may_be_written_in_upper_case(keys_file: Path) -> None:
    digest = hashlib.sha256(b"shouting").hexdigest().upper()
    keys = store(keys_file, {"name": "loud", "key": f"sha256:{digest}"})
    assert keys.authenticate("Bearer shouting") == keys.keys[0]


def test_the_sha256_form_itself_is_not_a_key(two_keys: KeyStore) -> None:
    assert refusal(two_keys, f"Bearer {sha('hashed-secret-2')}") == INVALID


@pytest.mark.parametrize(
    "header",
    ["bearer plain-secret-1", "BEARER plain-secret-1", "  Bearer \t plain-secret-1  \r\n"],
)
def test_scheme_in_any_case_and_surrounding_whitespace_are_accepted(
    two_keys: KeyStore, header: str
) -> None:
    key = two_keys.authenticate(header)
    assert key is not None and key.name == "plain"


def test_wrong_key_is_refused(two_keys: KeyStore) -> None:
    assert refusal(two_keys, "Bearer plain-secret-2") == INVALID


@pytest.mark.parametrize("header", [None, "", "   "])
def test_missing_header_is_refused(two_keys: KeyStore, header: str | None) -> None:
    assert refusal(two_keys, header) == MISSING


@pytest.mark.parametrize("header", ["Basic cGxhaW46c2VjcmV0", "plain-secret-1", "Token abc"])
def test_other_scheme_is_refused(two_keys: KeyStore, header: str) -> None:
    assert refusal(two_keys, header) == WRONG_SCHEME


@pytest.mark.parametrize("header", ["Bearer", "Bearer   ", "bearer\t"])
def test_bearer_without_key_is_refused(two_keys: KeyStore, header: str) -> None:
    assert refusal(two_keys, header) == NO_KEY


def test_key_with_spaces_is_refused(two_keys: KeyStore) -> None:
    assert refusal(two_keys, "Bearer plain secret") == SPACES


def test_a_key_with_undecodable_bytes_is_refused_not_a_crash(two_keys: KeyStore) -> None:
    """A header decoded with surrogateescape holds lone surrogates; they hash."""
    header = b"Bearer plain-secret-\xff".decode("utf-8", "surrogateescape")
    assert refusal(two_keys, header) == INVALID


def test_refusal_is_a_401_authentication_error(two_keys: KeyStore) -> None:
    with pytest.raises(Unauthorized) as caught:
        two_keys.authenticate("Bearer nope")
    assert caught.value.status == 401
    assert caught.value.to_dict() == {
        "error": {
            "message": INVALID,
            "type": "authentication_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }


@pytest.mark.parametrize(
    "header",
    [
        "Bearer s3cr3t-Presented",
        "Basic s3cr3t-Presented",
        "s3cr3t-Presented",
        "s3cr3t-Presented extra",
        "Bearer s3cr3t-Presented extra",
        "Bearer plain-secret-1 s3cr3t-Presented",
    ],
)
def test_messages_never_contain_the_presented_key(two_keys: KeyStore, header: str) -> None:
    with pytest.raises(Unauthorized) as caught:
        two_keys.authenticate(header)
    for text in (caught.value.message, str(caught.value), repr(caught.value)):
        assert "s3cr3t" not in text
        assert "Presented" not in text


def test_every_stored_digest_is_compared_even_after_a_match(
    keys_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = store(keys_file, *({"name": f"k{i}", "key": f"secret-{i}"} for i in range(5)))
    calls: list[bytes] = []
    compare = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(b)
        return compare(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    key = keys.authenticate("Bearer secret-0")
    assert key is not None and key.name == "k0"
    assert calls == [k.digest for k in keys.keys]


def test_empty_key_list_refuses_everyone(keys_file: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="llmux.auth"):
        keys = store(keys_file)
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        f"API keys loaded from {keys_file}: none, every request will be refused")
    assert keys.enabled and keys.keys == ()
    assert refusal(keys, "Bearer anything") == INVALID


def test_disabled_store_returns_none_for_any_header() -> None:
    keys = KeyStore(None)
    assert not keys.enabled
    assert keys.keys == ()
    for header in (None, "", "Basic abc", "Bearer whatever"):
        assert keys.authenticate(header) is None
    assert keys.reload_if_changed() is False


@given(
    stored=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1),
    other=st.text(),
    hashed=st.booleans(),
)
def test_only_the_stored_key_authenticates(stored: str, other: str, hashed: bool) -> None:
    assume(not stored.lower().startswith("sha256:"))
    assume(other.split() != [stored])
    with tempfile.TemporaryDirectory() as tmp:
        entry = {"name": "only", "key": sha(stored) if hashed else stored}
        keys = store(Path(tmp) / "keys.yaml", entry)
        assert keys.authenticate(f"Bearer {stored}") == keys.keys[0]
        with pytest.raises(Unauthorized):
            keys.authenticate(f"Bearer {other}")


# --- ApiKey ------------------------------------------------------------------------------


def test_star_allows_every_model() -> None:
    key = ApiKey.from_key("all", "k", models=["*"])
    assert key.allows("Qwen") and key.allows("anything-at-all")


def test_a_list_allows_exactly_its_names() -> None:
    key = ApiKey.from_key("some", "k", models=["Qwen", "whisper"])
    assert key.allows("Qwen") and key.allows("whisper")
    assert not key.allows("qwen")
    assert not key.allows("Qwen2")


def test_absent_models_allow_every_model() -> None:
    [key] = parse_keys({"keys": [{"name": "a", "key": "k"}]}, "keys.yaml")
    assert key.models == ("*",)
    assert key.allows("Qwen")


def test_empty_models_allow_none() -> None:
    [key] = parse_keys({"keys": [{"name": "a", "key": "k", "models": []}]}, "keys.yaml")
    assert not key.allows("Qwen")


def test_admin_does_not_widen_the_models() -> None:
    [key] = parse_keys(
        {"keys": [{"name": "root", "key": "k", "admin": True, "models": ["Qwen"]}]}, "keys.yaml"
    )
    assert key.admin
    assert not key.allows("whisper")


def test_repr_shows_neither_key_nor_digest() -> None:
    key = ApiKey.from_key("svc", "hunter2-secret")
    assert key.digest == hashlib.sha256(b"hunter2-secret").digest()
    text = repr(key)
    assert "hunter2" not in text
    assert key.digest.hex() not in text and repr(key.digest) not in text
    assert "svc" in text


def test_digest_must_be_32_bytes() -> None:
    with pytest.raises(ValueError, match="32-byte"):
        ApiKey(name="x", digest=b"short")


# --- parse_keys --------------------------------------------------------------------------


def test_keys_are_stored_as_digests() -> None:
    plain, hashed = parse_keys(
        {
            "keys": [
                {"name": "p", "key": "plain-key", "models": ["Qwen"], "admin": True},
                {"name": "h", "key": sha("hashed-key")},
            ]
        },
        "keys.yaml",
    )
    assert plain == ApiKey(
        name="p", digest=hashlib.sha256(b"plain-key").digest(), models=("Qwen",), admin=True
    )
    assert hashed == ApiKey(name="h", digest=hashlib.sha256(b"hashed-key").digest())


def test_empty_key_list_is_valid() -> None:
    assert parse_keys({"keys": []}, "keys.yaml") == []


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (None, '(top level): expected a mapping with a "keys" list, the file is empty'),
        (["a"], '(top level): expected a mapping with a "keys" list, got a list'),
        ({}, "keys: required"),
        ({"keys": None}, "keys: expected a list (keys: [] for none), got null"),
        ({"keys": {"a": 1}}, "keys: expected a list (keys: [] for none), got a mapping"),
        ({"keys": ["sk-live"]}, "keys[0]: expected a mapping with name and key, got a string"),
        ({"keys": [{"key": "k"}]}, "keys[0].name: required"),
        ({"keys": [{"name": 7, "key": "k"}]}, "keys[0].name: expected a string, got 7"),
        ({"keys": [{"name": " ", "key": "k"}]}, "keys[0].name: must not be empty"),
        ({"keys": [{"name": True, "key": "k"}]}, "keys[0].name: expected a string, got true"),
        ({"keys": [{"name": "a"}]}, "keys[0].key: required"),
        ({"keys": [{"name": "a", "key": ""}]}, "keys[0].key: must not be empty"),
        (
            {"keys": [{"name": "a", "key": 12345678}]},
            "keys[0].key: expected a string, got an integer (quote the key)",
        ),
        (
            {"keys": [{"name": "a", "key": None}]},
            "keys[0].key: expected a string, got null (quote the key)",
        ),
        (
            {"keys": [{"name": "a", "key": True}]},
            "keys[0].key: expected a string, got a boolean (quote the key)",
        ),
        (
            {"keys": [{"name": "a", "key": "sha256:abc"}]},
            'keys[0].key: "sha256:" must be followed by 64 hex digits',
        ),
        (
            {"keys": [{"name": "a", "key": "sha256:" + "g" * 64}]},
            'keys[0].key: "sha256:" must be followed by 64 hex digits',
        ),
        (
            {"keys": [{"name": "a", "key": "SHA256:" + "0" * 63}]},
            'keys[0].key: "sha256:" must be followed by 64 hex digits',
        ),
        (
            {"keys": [{"name": "a", "key": "two words"}]},
            "keys[0].key: a plain key must be printable ASCII without spaces "
            "(clients send it in an HTTP header)",
        ),
        (
            {"keys": [{"name": "a", "key": "schlüssel"}]},
            "keys[0].key: a plain key must be printable ASCII without spaces "
            "(clients send it in an HTTP header)",
        ),
        (
            {"keys": [{"name": "a", "key": "k", "models": "*"}]},
            'keys[0].models: expected a list of model names or ["*"], got "*"',
        ),
        (
            {"keys": [{"name": "a", "key": "k", "models": None}]},
            'keys[0].models: expected a list of model names or ["*"], got null',
        ),
        (
            {"keys": [{"name": "a", "key": "k", "models": ["Qwen", 3]}]},
            "keys[0].models[1]: expected a model name, got 3",
        ),
        (
            {"keys": [{"name": "a", "key": "k", "models": [""]}]},
            "keys[0].models[0]: must not be empty",
        ),
        (
            {"keys": [{"name": "a", "key": "k", "models": ["Qwen", " "]}]},
            "keys[0].models[1]: must not be empty",
        ),
        (
            {"keys": [{"name": "a", "key": "k", "admin": "yes"}]},
            'keys[0].admin: expected true or false, got "yes"',
        ),
        (
            {"keys": [{"name": "a", "key": "k", "secret": "x"}]},
            "keys[0].secret: unknown field (expected name, key, models, admin)",
        ),
        ({"keys": [], "version": 2}, "version: unknown field (expected keys)"),
    ],
)
def test_each_mistake_is_named_by_path(data: object, problem: str) -> None:
    assert problems_of(data) == [problem]


def test_duplicate_names_are_refused() -> None:
    data = {
        "keys": [{"name": "a", "key": "k1"}, {"name": "b", "key": "k2"}, {"name": "a", "key": "k3"}]
    }
    assert problems_of(data) == ['keys[2].name: duplicate name "a" (first used by keys[0])']


def test_the_same_key_twice_is_refused_even_when_written_differently() -> None:
    data = {"keys": [{"name": "a", "key": "same"}, {"name": "b", "key": sha("same")}]}
    assert problems_of(data) == ["keys[1].key: the same key as keys[0]"]


def test_every_problem_is_reported_at_once_in_document_order() -> None:
    data = {
        "keys": [
            {"key": "ok-1", "token": "x"},
            {"name": "b", "key": "sha256:1234", "models": "Qwen"},
            {"name": "c", "key": "ok-3", "admin": 1},
            "loose-key",
            {"name": "c", "key": "ok-1", "models": [None]},
        ],
        "extra": True,
    }
    assert problems_of(data) == [
        "keys[0].name: required",
        "keys[0].token: unknown field (expected name, key, models, admin)",
        'keys[1].key: "sha256:" must be followed by 64 hex digits',
        'keys[1].models: expected a list of model names or ["*"], got "Qwen"',
        "keys[2].admin: expected true or false, got 1",
        "keys[3]: expected a mapping with name and key, got a string",
        'keys[4].name: duplicate name "c" (first used by keys[2])',
        "keys[4].key: the same key as keys[0]",
        "keys[4].models[0]: expected a model name, got null",
        "extra: unknown field (expected keys)",
    ]


def test_an_unknown_field_before_the_keys_is_listed_before_their_problems() -> None:
    data = {"version": 2, "keys": [{"name": "a"}], "extra": True}
    assert problems_of(data) == [
        "version: unknown field (expected keys)",
        "keys[0].key: required",
        "extra: unknown field (expected keys)",
    ]


def test_the_error_message_lists_every_problem_and_the_source() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_keys({"keys": [{"key": ""}]}, "/etc/llmux/api_keys.yaml")
    assert str(caught.value) == (
        "invalid configuration in /etc/llmux/api_keys.yaml (2 problems):"
        "\n  keys[0].name: required"
        "\n  keys[0].key: must not be empty"
    )


@pytest.mark.parametrize(
    "value", ["sk-secret-value!", "sk secret value", "sha256:sk-secret-value", 987654321]
)
def test_problems_never_quote_a_key(value: object) -> None:
    problems = problems_of({"keys": [{"name": "a", "key": value}], "x": 1})
    assert problems
    for problem in problems:
        assert "secret" not in problem and "987654321" not in problem


# --- load_keys ---------------------------------------------------------------------------


def test_example_file_parses() -> None:
    openwebui, dictation, admin = load_keys(EXAMPLE)
    assert (openwebui.name, openwebui.models, openwebui.admin) == ("openwebui", ("*",), False)
    assert (dictation.name, dictation.models, dictation.admin) == (
        "dictation",
        ("cohere-transcribe", "Chatterbox-Turbo"),
        False,
    )
    assert (admin.name, admin.models, admin.admin) == ("admin", ("*",), True)


def test_example_digests_are_of_the_keys_its_comments_name() -> None:
    keys = KeyStore(EXAMPLE)
    for header, name in [
        ("Bearer example-openwebui-key", "openwebui"),
        ("Bearer example-dictation-key", "dictation"),
        ("Bearer change-me-admin", "admin"),
    ]:
        key = keys.authenticate(header)
        assert key is not None and key.name == name


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as caught:
        load_keys(path)
    assert caught.value.problems == [f"{path}: No such file or directory"]
    assert caught.value.source == str(path)


def test_bad_yaml_is_named_with_its_position_but_not_its_text(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text('keys:\n  - name: a\n    key: "sk-unterminated\n', encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_keys(path)
    [problem] = caught.value.problems
    assert problem.startswith(f"{path}:4:1: ")
    assert "sk-unterminated" not in str(caught.value)


@pytest.mark.parametrize("tag", ["!!int", "!!float", "!!timestamp", "!!bool"])
def test_a_key_under_a_tag_it_does_not_fit_is_named_but_not_quoted(
        tmp_path: Path, tag: str) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(f"keys:\n  - name: a\n    key: {tag} sk-secret-789\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_keys(path)
    [problem] = caught.value.problems
    assert problem.startswith(f"{path}:3:10: the value is not a valid ")
    assert "sk-secret" not in str(caught.value) and caught.value.__cause__ is None


def test_an_edit_with_a_bad_tag_keeps_the_old_keys(keys_file: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    keys = store(keys_file, {"name": "a", "key": "a-key"})
    keys_file.write_text("keys:\n  - name: a\n    key: !!int sk-new-789\n", encoding="utf-8")
    os.utime(keys_file, ns=(1, 1))
    assert keys.reload_if_changed() is False
    assert keys.authenticate("Bearer a-key") is not None
    assert "sk-new" not in caplog.text


def test_invalid_file_problems_carry_the_file_name(tmp_path: Path) -> None:
    path = write(tmp_path / "keys.yaml", {"name": "a"})
    with pytest.raises(ConfigError) as caught:
        load_keys(path)
    assert caught.value.problems == ["keys[0].key: required"]
    assert caught.value.source == str(path)


def test_store_refuses_to_start_on_an_invalid_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        KeyStore(write(tmp_path / "keys.yaml", {"name": "a", "key": "sha256:00"}))


# --- reload ------------------------------------------------------------------------------


def test_edit_takes_effect_once_the_interval_has_passed(keys_file: Path) -> None:
    clock = FakeClock()
    keys = store(keys_file, {"name": "old", "key": "old-key"}, clock=clock)
    write(keys_file, {"name": "new", "key": "new-key"})
    clock.now = RELOAD_INTERVAL_S / 2
    assert keys.authenticate("Bearer old-key") is not None
    assert refusal(keys, "Bearer new-key") == INVALID
    clock.now = RELOAD_INTERVAL_S
    key = keys.authenticate("Bearer new-key")
    assert key is not None and key.name == "new"
    assert refusal(keys, "Bearer old-key") == INVALID


def test_the_file_is_checked_at_most_once_per_interval(
    keys_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    keys = store(keys_file, {"name": "a", "key": "a-key"}, clock=clock)
    checks: list[float] = []

    def reload_if_changed() -> bool:
        checks.append(clock.now)
        return False

    monkeypatch.setattr(keys, "reload_if_changed", reload_if_changed)
    for now in (0.0, 0.5, 0.99, 1.0, 1.5, 1.99, 2.0, 2.5, 10.0):
        clock.now = now
        keys.authenticate("Bearer a-key")
    assert checks == [1.0, 2.0, 10.0]


def test_reload_if_changed_reports_whether_new_keys_took_effect(keys_file: Path) -> None:
    keys = store(keys_file, {"name": "a", "key": "a-key"})
    assert keys.reload_if_changed() is False
    write(keys_file, {"name": "a", "key": "a-key"}, {"name": "b", "key": "b-key"})
    assert keys.reload_if_changed() is True
    assert [k.name for k in keys.keys] == ["a", "b"]
    assert keys.reload_if_changed() is False


def test_a_replaced_file_is_seen_by_its_inode(keys_file: Path) -> None:
    keys = store(keys_file, {"name": "a", "key": "a-key"})
    stat = keys_file.stat()
    replacement = write(keys_file.with_suffix(".new"), {"name": "b", "key": "b-key"})
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(replacement, keys_file)
    assert keys.reload_if_changed() is True
    assert [k.name for k in keys.keys] == ["b"]


def test_invalid_edit_keeps_the_old_keys_and_warns_once(
    keys_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys = store(keys_file, {"name": "a", "key": "a-key"})
    write(keys_file, {"name": "a", "key": "sha256:bad", "token": "leaked-secret"})
    with caplog.at_level(logging.WARNING, logger="llmux.auth"):
        assert keys.reload_if_changed() is False
        assert keys.reload_if_changed() is False
    assert keys.authenticate("Bearer a-key") is not None
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        f"API keys file {keys_file} changed but cannot be used; keeping the 1 keys in force:"
        '\n  keys[0].key: "sha256:" must be followed by 64 hex digits'
        "\n  keys[0].token: unknown field (expected name, key, models, admin)"
    )


def test_invalid_yaml_edit_keeps_the_old_keys(keys_file: Path) -> None:
    keys = store(keys_file, {"name": "a", "key": "a-key"})
    keys_file.write_text("keys: [", encoding="utf-8")
    os.utime(keys_file, ns=(1, 1))
    assert keys.reload_if_changed() is False
    assert keys.authenticate("Bearer a-key") is not None


def test_a_fixed_file_is_loaded_after_a_broken_one(keys_file: Path) -> None:
    keys = store(keys_file, {"name": "a", "key": "a-key"})
    write(keys_file, {"name": "a"})
    assert keys.reload_if_changed() is False
    write(keys_file, {"name": "b", "key": "b-key"})
    assert keys.reload_if_changed() is True
    assert [k.name for k in keys.keys] == ["b"]


def test_deleted_file_keeps_the_old_keys_and_warns_once(
    keys_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    keys = store(keys_file, {"name": "a", "key": "a-key"}, clock=clock)
    keys_file.unlink()
    with caplog.at_level(logging.WARNING, logger="llmux.auth"):
        for now in (1.0, 2.0, 3.0):
            clock.now = now
            assert keys.authenticate("Bearer a-key") is not None
    [record] = caplog.records
    assert record.getMessage() == (
        f"API keys file {keys_file} was deleted (No such file or directory); "
        "keeping the 1 keys in force"
    )


def test_a_recreated_file_is_loaded_after_deletion(keys_file: Path) -> None:
    keys = store(keys_file, {"name": "a", "key": "a-key"})
    keys_file.unlink()
    assert keys.reload_if_changed() is False
    write(keys_file, {"name": "b", "key": "b-key"})
    assert keys.reload_if_changed() is True
    assert [k.name for k in keys.keys] == ["b"]


def test_logs_name_keys_but_never_contain_them(
    keys_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="llmux.auth"):
        keys = store(keys_file, {"name": "webui", "key": "very-secret-1"})
        write(keys_file, {"name": "webui", "key": "very-secret-2"}, {"name": "x", "key": ""})
        keys.reload_if_changed()
        write(keys_file, {"name": "webui", "key": "very-secret-3"})
        keys.reload_if_changed()
        keys_file.unlink()
        keys.reload_if_changed()
    assert len(caplog.records) == 4
    assert caplog.records[0].getMessage() == f"API keys loaded from {keys_file}: 1 (webui)"
    assert caplog.records[2].getMessage() == f"API keys reloaded from {keys_file}: 1 (webui)"
    assert "very-secret" not in caplog.text
    assert hashlib.sha256(b"very-secret-1").hexdigest() not in caplog.text
