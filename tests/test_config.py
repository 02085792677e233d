"""The config loader: shipped files load, sizes parse, every mistake is named by path."""

import copy
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmux.backends import BACKEND_MODULES, load_backend_class
from llmux.config import (
    BACKENDS,
    CONCURRENT_BACKENDS,
    MODEL_TYPES,
    Config,
    ConfigError,
    Device,
    PhysicalModel,
    Policy,
    VirtualModel,
    load_config,
    parse_config,
    parse_size,
    problems,
)
from llmux.config_report import format_bytes, render_summary

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
SHIPPED = sorted(p for p in CONFIG_DIR.glob("*.yaml") if not p.name.startswith("api_keys"))

MINIMAL: dict[str, Any] = {
    "devices": {"cuda:0": {"capacity": "16GB", "safety_margin": "512MiB"}},
    "physical_models": {
        "qwen3.5-4b": {"type": "llm", "backend": "transformers", "estimated_vram": "4GB"},
    },
    "virtual_models": {"Qwen": {"physical": "qwen3.5-4b"}},
}


def doc(**sections: Any) -> dict[str, Any]:
    """MINIMAL with some sections replaced (a deep copy: tests may nest into it)."""
    data = copy.deepcopy(MINIMAL)
    data.update(copy.deepcopy(sections))
    return data


def model(**fields: Any) -> dict[str, Any]:
    """A valid physical model entry with ``fields`` changed."""
    return {"type": "llm", "backend": "transformers", "estimated_vram": "4GB", **fields}


def problems_of(data: object) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    return caught.value.problems


# --- shipped configurations -------------------------------------------------------------


def test_there_are_three_shipped_configs() -> None:
    assert [p.name for p in SHIPPED] == ["fake.yaml", "kischdle-5070ti.yaml", "llmux.yaml",
                                         "p40.yaml"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    config = load_config(path)
    assert config.source == str(path)
    assert config.virtual_models and config.physical_models


def test_the_fake_config_runs_fake_models_on_a_cpu_budget() -> None:
    config = load_config(CONFIG_DIR / "fake.yaml")
    assert config.devices == {"cpu": Device(id="cpu", capacity=10**9, safety_margin=0)}
    assert {m.backend for m in config.physical_models.values()} == {"fake"}
    assert {n: v.physical for n, v in config.virtual_models.items()} == {
        "chat": "fake-chat",
        "chat-thinking": "fake-chat",
        "whisper": "fake-asr",
        "tts": "fake-tts",
        "embed": "fake-embed",
    }
    assert config.virtual_models["chat-thinking"].enable_thinking is True
    for m in config.physical_models.values():
        assert parse_size(m.options["footprint"]) < m.estimated_vram


def test_kischdle_offers_exactly_the_sixteen_virtual_models() -> None:
    config = load_config(CONFIG_DIR / "kischdle-5070ti.yaml")
    qwen = ["Qwen3.5-9B-FP8", "Qwen3.5-9B-FP8-Uncensored", "Qwen3.5-4B"]
    gpt = ["GPT-OSS-20B", "GPT-OSS-20B-Uncensored"]
    expected = {f"{q}-{mode}" for q in qwen for mode in ("Thinking", "Instruct")}
    expected |= {f"{g}-{effort}" for g in gpt for effort in ("Low", "Medium", "High")}
    expected |= {"cohere-transcribe", "Chatterbox-Turbo", "Chatterbox-Multilingual", "Chatterbox"}
    assert len(expected) == 16
    assert set(config.virtual_models) == expected
    assert config.virtual_models["GPT-OSS-20B-Uncensored-High"].system_prompt_prefix == (
        "Reasoning: high"
    )
    assert config.virtual_models["Qwen3.5-4B-Instruct"].enable_thinking is False


def test_kischdle_has_nine_physical_models_in_two_exclusive_groups() -> None:
    config = load_config(CONFIG_DIR / "kischdle-5070ti.yaml")
    groups: dict[str | None, set[str]] = {}
    for m in config.physical_models.values():
        groups.setdefault(m.exclusive_group, set()).add(m.id)
    assert groups == {
        "llm": {
            "qwen3.5-9b-fp8",
            "qwen3.5-9b-fp8-uncensored",
            "qwen3.5-4b",
            "gpt-oss-20b",
            "gpt-oss-20b-uncensored",
        },
        "tts": {"chatterbox-turbo", "chatterbox-multilingual", "chatterbox"},
        None: {"cohere-transcribe"},
    }
    ranks = {m.type: m.priority(config.policy) for m in config.physical_models.values()}
    assert ranks["asr"] > ranks["tts"] > ranks["llm"]
    assert all(m.idle_timeout_s is None for m in config.physical_models.values())
    assert config.physical_models["chatterbox"].python == "/opt/chatterbox-venv/bin/python"
    assert config.devices["cuda:0"] == Device(id="cuda:0", capacity=None, safety_margin=2**29)


def test_p40_unloads_every_model_after_five_idle_minutes() -> None:
    config = load_config(CONFIG_DIR / "p40.yaml")
    assert config.server.port == 8088
    assert {m.type for m in config.physical_models.values()} == {"llm", "vlm", "asr", "forecast"}
    assert all(m.idle_timeout_s == 300 for m in config.physical_models.values())


# --- sizes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("9GB", 9_000_000_000),
        ("9 GB", 9_000_000_000),
        ("9gb", 9_000_000_000),
        ("512MiB", 536_870_912),
        ("512 mib", 536_870_912),
        ("1.5 GiB", 1_610_612_736),
        ("300MB", 300_000_000),
        ("2KB", 2000),
        ("2KiB", 2048),
        ("1TB", 10**12),
        ("1TiB", 2**40),
        ("100B", 100),
        ("100", 100),
        ("1.5B", 2),  # fractions round half to even
        ("2.5B", 2),
        ("0.0015KB", 2),
        (1024, 1024),
        (0, 0),
        (2048.0, 2048),
    ],
)
def test_parse_size_accepts(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "value",
    [
        "9 gigs",
        "9G",
        "GB",
        "",
        "-1GB",
        "9e9",
        "1,5GB",
        "nan",
        True,
        False,
        -1,
        float("nan"),
        float("inf"),
        1.5,
        None,
        [9],
        "9 GB GB",
    ],
)
def test_parse_size_rejects(value: object) -> None:
    with pytest.raises(ValueError) as caught:
        parse_size(value)
    assert str(caught.value) == f"{value!r} is not a size"


@given(st.integers(min_value=0, max_value=2**62))
def test_parse_size_round_trips_integers(n: int) -> None:
    assert parse_size(n) == n
    assert parse_size(str(n)) == n
    assert parse_size(f"{n}B") == n
    assert parse_size(f"{n} KiB") == n * 1024


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (9_000_000_000, "9.0 GB"),
        (512_000_000, "512.0 MB"),
        (536_870_912, "536.9 MB"),
        (999_960_000, "1.0 GB"),
        (1500, "1.5 KB"),
        (999, "999 B"),
        (1000, "1.0 KB"),
        (-1500, "-1.5 KB"),
        (0, "0 B"),
        (13 * 10**12, "13.0 TB"),
    ],
)
def test_format_bytes_uses_decimal_units(n: int, text: str) -> None:
    assert format_bytes(n) == text


# --- structural problems: exact messages ------------------------------------------------


def test_a_bad_size_names_the_path() -> None:
    data = doc(physical_models={"qwen3.5-4b": model(estimated_vram="9 gigs")})
    assert problems_of(data) == [
        'physical_models.qwen3.5-4b.estimated_vram: "9 gigs" is not a size'
    ]


@pytest.mark.parametrize(
    ("section", "value", "message"),
    [
        ({"server": {"port": "8081"}}, None, 'server.port: expected an integer, got "8081"'),
        ({"server": {"port": 80.0}}, None, "server.port: expected an integer, got 80.0"),
        ({"server": {"port": True}}, None, "server.port: expected an integer, got true"),
        ({"server": {"host": 127}}, None, "server.host: expected a string, got 127"),
        (
            {"policy": {"strict_priority": 1}},
            None,
            "policy.strict_priority: expected a boolean, got 1",
        ),
        (
            {"policy": {"strict_priority": "no"}},
            None,
            'policy.strict_priority: expected a boolean, got "no"',
        ),
        (
            {"policy": {"min_residency_s": "10"}},
            None,
            'policy.min_residency_s: expected a number, got "10"',
        ),
        (
            {"policy": {"min_residency_s": False}},
            None,
            "policy.min_residency_s: expected a number, got false",
        ),
        (
            {"policy": {"priority_classes": {"llm": "10"}}},
            None,
            'policy.priority_classes.llm: expected an integer, got "10"',
        ),
        (
            {"policy": {"priority_classes": [1]}},
            None,
            "policy.priority_classes: expected a mapping, got a list",
        ),
        (
            {"devices": {"cpu": {"capacity": "lots"}}},
            None,
            'devices.cpu.capacity: "lots" is not a size or "auto"',
        ),
        (
            {"policy": {"min_residency_s": float("nan")}},
            None,
            "policy.min_residency_s: expected a number, got nan",
        ),
        (  # a mapping key YAML read as a number is still named as a word, not an index
            {"policy": {"priority_classes": {"llm": 10, 5: 1}}},
            None,
            "policy.priority_classes.5: expected a string, got 5",
        ),
    ],
)
def test_wrong_scalar_types_are_errors(section: dict[str, Any], value: None, message: str) -> None:
    assert problems_of(doc(**section)) == [message]


def test_yes_is_not_a_boolean() -> None:
    data = doc(physical_models={"x": model(pinned="yes")}, virtual_models={"v": {"physical": "x"}})
    assert problems_of(data) == ['physical_models.x.pinned: expected a boolean, got "yes"']


def test_a_string_is_not_a_list_of_capabilities() -> None:
    data = doc(physical_models={"qwen3.5-4b": model(capabilities="vision")})
    assert problems_of(data) == [
        'physical_models.qwen3.5-4b.capabilities: expected a list, got "vision"'
    ]


def test_unknown_keys_are_errors_at_every_depth() -> None:
    data = doc(
        bogus=1,
        policy={"bogus": 2},
        devices={"cuda:0": {"capcity": "16GB"}},
        physical_models={"qwen3.5-4b": model(pined=True)},
        virtual_models={"Qwen": {"physical": "qwen3.5-4b", "sampling": {"temprature": 0.5}}},
    )
    assert problems_of(data) == [
        "devices.cuda:0.capcity: unknown key (did you mean capacity?)",
        "physical_models.qwen3.5-4b.pined: unknown key (did you mean pinned?)",
        "virtual_models.Qwen.sampling.temprature: unknown key (did you mean temperature?)",
        "bogus: unknown key",
        "policy.bogus: unknown key",
    ]


def test_the_name_comes_from_the_mapping_key_not_an_id_field() -> None:
    data = doc(physical_models={"qwen3.5-4b": model(id="other")})
    assert problems_of(data) == ["physical_models.qwen3.5-4b.id: unknown key"]


def test_a_missing_required_field_is_named() -> None:
    data = doc(virtual_models={"Foo": {"enable_thinking": True}})
    assert problems_of(data) == ["virtual_models.Foo.physical: required"]


def test_missing_sections_are_named() -> None:
    assert problems_of({"server": {}}) == [
        "physical_models: required",
        "virtual_models: required",
    ]


@pytest.mark.parametrize(
    ("data", "got"),
    [
        (None, "the configuration is empty"),
        ({}, "the configuration is empty"),
        ([], "got a list"),
        ("text", 'got "text"'),
    ],
)
def test_a_document_that_is_not_a_mapping_is_refused(data: object, got: str) -> None:
    assert problems_of(data) == [f"(top level): expected a mapping of sections, {got}"]


# --- cross-field problems ---------------------------------------------------------------


def test_an_unknown_physical_model_is_named() -> None:
    data = doc(virtual_models={"Qwen": {"physical": "qwen3.5-9b"}})
    assert problems_of(data) == [
        'virtual_models.Qwen.physical: unknown physical model "qwen3.5-9b"'
    ]


def test_an_unknown_device_is_named() -> None:
    data = doc(physical_models={"qwen3.5-4b": model(device="cuda:1")})
    assert problems_of(data) == ['physical_models.qwen3.5-4b.device: unknown device "cuda:1"']


def test_a_device_id_must_be_cpu_or_cuda_index() -> None:
    data = doc(devices={"gpu0": {}, "cuda:01": {}, "cpu": {}})
    assert problems_of(data) == [
        'devices.gpu0: a device id is "cpu" or "cuda:<N>"',
        'devices.cuda:01: a device id is "cpu" or "cuda:<N>"',
    ]


def test_a_model_bigger_than_its_device_is_refused() -> None:
    data = doc(physical_models={"qwen3.5-4b": model(estimated_vram="16GB")})
    assert problems_of(data) == [
        "physical_models.qwen3.5-4b.estimated_vram: 16.0 GB does not fit on cuda:0 "
        "(15.5 GB usable: capacity minus safety margin)"
    ]


def test_pinned_models_must_fit_their_device_together() -> None:
    data = doc(
        physical_models={
            "a": model(estimated_vram="9GB", pinned=True),
            "b": model(estimated_vram="9GB", pinned=True),
        },
        virtual_models={},
    )
    assert problems_of(data) == [
        "devices.cuda:0: pinned models need 18.0 GB but only 15.5 GB is usable"
    ]


def test_out_of_range_numbers_and_unknown_names_are_named() -> None:
    data = doc(
        server={"port": 0},
        physical_models={
            "qwen3.5-4b": model(
                type="chat",
                backend="vllm",
                capabilities=["tools", "fly"],
                load_timeout_s=0,
                idle_timeout_s=-1,
                max_concurrency=0,
                priority_class="urgent",
            )
        },
    )
    assert problems_of(data) == [
        'physical_models.qwen3.5-4b.type: unknown type "chat" '
        "(expected one of llm, vlm, ocr, asr, tts, embedding, forecast)",
        'physical_models.qwen3.5-4b.backend: unknown backend "vllm" (expected one of fake, '
        "llama_cpp, llama_server, transformers, faster_whisper, piper, chatterbox, "
        "rapidocr)",
        'physical_models.qwen3.5-4b.capabilities[1]: unknown capability "fly" '
        "(expected one of vision, tools, reasoning, translate)",
        "physical_models.qwen3.5-4b.load_timeout_s: must be positive",
        "physical_models.qwen3.5-4b.idle_timeout_s: must not be negative",
        "physical_models.qwen3.5-4b.max_concurrency: must be at least 1",
        'physical_models.qwen3.5-4b.priority_class: unknown priority class "urgent" '
        "(not in policy.priority_classes)",
        "server.port: must be between 1 and 65535",  # doc() appends server: document order
    ]


def test_a_pinned_model_has_no_idle_timeout() -> None:
    data = doc(physical_models={"qwen3.5-4b": model(pinned=True, idle_timeout_s=300)})
    assert problems_of(data) == [
        "physical_models.qwen3.5-4b.idle_timeout_s: a pinned model stays loaded, so it "
        "never idles out: leave one of the two out"
    ]


def test_all_problems_are_reported_at_once_in_document_order() -> None:
    data = {
        "server": {"port": "8081"},
        "devices": {"cuda:0": {"capacity": "16GB"}},
        "physical_models": {
            "qwen3.5-4b": model(estimated_vram="9 gigs", pinned="yes"),
            "gpt-oss-20b": model(device="cuda:1"),
        },
        "virtual_models": {
            "Foo": {},
            "Bar": {"physical": "nothing"},
            "Qwen": {"physical": "qwen3.5-4b"},
        },
        "policy": {"bogus": 1},
    }
    assert problems_of(data) == [
        'server.port: expected an integer, got "8081"',
        'physical_models.qwen3.5-4b.estimated_vram: "9 gigs" is not a size',
        'physical_models.qwen3.5-4b.pinned: expected a boolean, got "yes"',
        'physical_models.gpt-oss-20b.device: unknown device "cuda:1"',
        "virtual_models.Foo.physical: required",
        'virtual_models.Bar.physical: unknown physical model "nothing"',
        "policy.bogus: unknown key",
    ]


def test_problems_is_pure_and_takes_a_built_config() -> None:
    config = Config(
        devices={"cpu": Device(id="cpu", capacity=10**9)},
        physical_models={
            "m": PhysicalModel(id="m", type="llm", backend="fake", estimated_vram=2 * 10**9)
        },
        virtual_models={"v": VirtualModel(name="v", physical="gone")},
    )
    assert problems(config) == [
        "physical_models.m.estimated_vram: 2.0 GB does not fit on cpu "
        "(1.0 GB usable: capacity minus safety margin)",
        'virtual_models.v.physical: unknown physical model "gone"',
    ]


def test_more_than_one_request_at_once_on_a_serial_backend_is_refused() -> None:
    data = doc(physical_models={"m": model(backend="llama_cpp", max_concurrency=2)},
               virtual_models={"v": {"physical": "m"}})
    assert problems_of(data) == [
        "physical_models.m.max_concurrency: the llama_cpp backend serves one request at a "
        "time; more than 1 needs one of fake, llama_server"]


def test_a_concurrent_backend_takes_max_concurrency() -> None:
    data = doc(physical_models={"m": model(backend="llama_server", max_concurrency=4)},
               virtual_models={"v": {"physical": "m"}})
    assert parse_config(data).physical_models["m"].max_concurrency == 4


@pytest.mark.parametrize("backend", sorted(BACKEND_MODULES))
def test_the_concurrent_backends_listed_in_the_config_are_the_concurrent_ones(
    backend: str,
) -> None:
    try:
        cls = load_backend_class(backend)
    except ImportError as exc:
        pytest.skip(f"{backend}: its runtime is not installed ({exc})")
    assert cls.concurrent == (backend in CONCURRENT_BACKENDS)
    assert backend in BACKENDS


# --- defaults and derived values --------------------------------------------------------


def test_devices_default_to_one_cpu_with_auto_capacity() -> None:
    data = doc()
    del data["devices"]
    config = parse_config(data)
    assert config.devices == {"cpu": Device(id="cpu", capacity=None, safety_margin=0)}
    assert config.device_of(config.physical_models["qwen3.5-4b"]) == "cpu"


def test_an_empty_devices_mapping_is_refused() -> None:
    assert problems_of(doc(devices={})) == ["devices: at least one device is required"]


def test_priority_defaults_to_the_model_type() -> None:
    policy = Policy()
    asr = PhysicalModel(id="a", type="asr", backend="fake", estimated_vram=1)
    pinned_low = PhysicalModel(
        id="b", type="asr", backend="fake", estimated_vram=1, priority_class="llm"
    )
    assert (asr.priority(policy), pinned_low.priority(policy)) == (30, 10)


def test_relative_paths_resolve_against_the_config_directory(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    path = tmp_path / "etc" / "llmux.yaml"
    path.write_text(
        "server: {api_keys_file: keys/api_keys.yaml, state_dir: state}\n"
        "physical_models: {}\nvirtual_models: {}\n"
    )
    server = load_config(path).server
    assert server.api_keys_file == str(tmp_path / "etc" / "keys" / "api_keys.yaml")
    assert server.state_dir == str(tmp_path / "etc" / "state")
    assert server.resolved_state_dir() == tmp_path / "etc" / "state"


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    data = doc(server={"api_keys_file": "/etc/llmux/keys.yaml"})
    assert parse_config(data, base_dir=tmp_path).server.api_keys_file == "/etc/llmux/keys.yaml"


def test_state_dir_defaults_to_xdg_state_home() -> None:
    server = parse_config(doc()).server
    assert server.state_dir is None
    assert server.resolved_state_dir({"XDG_STATE_HOME": "/var/state"}) == Path("/var/state/llmux")
    assert server.resolved_state_dir({}) == Path.home() / ".local" / "state" / "llmux"


# --- files ------------------------------------------------------------------------------


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [f"{path}: No such file or directory"]


def test_a_yaml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("server:\n  port: [8081\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    (message,) = caught.value.problems
    assert message.startswith(f"{path}:3:1: ")


@pytest.mark.parametrize(("content", "problem"), [
    (b"server:\n  port: 1\n  port: 2\n", ":3:3: duplicate key 'port'"),
    (b"server:\n  port: !!int 80a81\n", ":2:9: the value is not a valid int"),
    ("server:\n  host: café\n".encode("latin-1"),
     ": not UTF-8 text (invalid continuation byte at byte 19)"),
], ids=["duplicate-key", "tag-misfit", "latin-1"])
def test_a_file_s_yaml_problem_is_listed_where_it_is(tmp_path: Path, content: bytes,
                                                     problem: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [f"{path}{problem}"]


def test_an_empty_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [
        "(top level): expected a mapping of sections, the configuration is empty"
    ]
    assert str(path) in str(caught.value)


def test_unquoted_yes_in_a_file_is_a_string_not_a_boolean(tmp_path: Path) -> None:
    path = tmp_path / "yes.yaml"
    path.write_text("policy: {strict_priority: yes}\nphysical_models: {}\nvirtual_models: {}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == ['policy.strict_priority: expected a boolean, got "yes"']


# --- summary ----------------------------------------------------------------------------


def test_summary_lists_devices_physical_and_virtual_models() -> None:
    config = load_config(CONFIG_DIR / "kischdle-5070ti.yaml")
    text = render_summary(config)
    assert [line for line in text.splitlines() if line.endswith("models") or line == "Devices"] == [
        "Devices",
        "Physical models",
        "Virtual models",
    ]
    assert "cuda:0  auto      536.9 MB" in text
    gpt = next(line for line in text.splitlines() if line.startswith("gpt-oss-20b "))
    assert gpt.split() == [
        "gpt-oss-20b",
        "llm",
        "transformers",
        "cuda:0",
        "13.0",
        "GB",
        "llm",
        "(10)",
        "llm",
        "-",
        "never",
    ]


def test_summary_truncates_long_system_prompt_prefixes() -> None:
    data = doc(
        virtual_models={"Qwen": {"physical": "qwen3.5-4b", "system_prompt_prefix": "x" * 80}}
    )
    text = render_summary(parse_config(data))
    assert ("x" * 37 + "...") in text and ("x" * 41) not in text


def test_cors_origins_are_origins_or_a_lone_star() -> None:
    fine = ["https://chat.example.com", "http://localhost:3000", "app://llmux"]
    assert parse_config(doc(server={"cors_origins": fine})).server.cors_origins == fine
    assert parse_config(doc(server={"cors_origins": ["*"]})).server.cors_origins == ["*"]
    assert parse_config(doc()).server.cors_origins == []
    data = doc(server={"cors_origins": ["https://ok.example", "https://a.example/",
                                        "chat.example.com", "https://Chat.example", "*"]})
    advice = ' is not an origin like "https://chat.example.com" (lower case, no path, ' \
             'no trailing slash), or "*" alone'
    assert problems_of(data) == [f'server.cors_origins[{i}]: "{origin}"{advice}'
                                 for i, origin in ((1, "https://a.example/"),
                                                   (2, "chat.example.com"),
                                                   (3, "https://Chat.example"), (4, "*"))]


def test_every_model_type_has_words_for_messages() -> None:
    from llmux.config import a_model_of_type

    for model_type in MODEL_TYPES:
        words = a_model_of_type(model_type)
        assert words.startswith(("a ", "an ")) and "model of type" not in words, words
    assert a_model_of_type("embedding") == "an embedding model"
    assert a_model_of_type("ocr") == "an OCR model"


# --- bounds and one message per mistake -------------------------------------------------


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("server", "port", 1),
        ("server", "port", 65535),
        ("server", "max_body_bytes", 1),
        ("server", "max_upload_bytes", 1),
        ("server", "metrics", "open"),
        ("server", "metrics", "admin"),
        ("server", "log_format", "json"),
        ("server", "shutdown_grace_s", 0),
        ("server", "read_timeout_s", 0.5),
        ("server", "keep_alive_s", 0.5),
        ("policy", "min_residency_s", 0),
        ("policy", "max_queue_per_model", 1),
        ("policy", "max_turn_requests", 1),
        ("policy", "max_turn_wait_s", 0.5),
        ("policy", "turn_load_multiple", 0),
        ("policy", "request_deadline_s", 0.5),
    ],
)
def test_values_at_their_bounds_are_accepted(section: str, key: str, value: object) -> None:
    config = parse_config(doc(**{section: {key: value}}))
    assert getattr(getattr(config, section), key) == value


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("server", "port", 65536, "must be between 1 and 65535"),
        ("server", "max_body_bytes", 0, "must be positive"),
        ("server", "max_upload_bytes", 0, "must be positive"),
        ("server", "metrics", "public",
         'unknown metrics access "public" (expected one of open, admin)'),
        ("server", "log_format", "xml", 'unknown log format "xml" (expected one of text, json)'),
        ("server", "shutdown_grace_s", -1, "must not be negative"),
        ("server", "read_timeout_s", 0, "must be positive"),
        ("server", "keep_alive_s", 0, "must be positive"),
        ("policy", "min_residency_s", -1, "must not be negative"),
        ("policy", "max_queue_per_model", 0, "must be at least 1"),
        ("policy", "max_turn_requests", 0, "must be at least 1"),
        ("policy", "max_turn_wait_s", 0, "must be positive"),
        ("policy", "turn_load_multiple", -0.5, "must not be negative"),
        ("policy", "request_deadline_s", 0, "must be positive"),
    ],
)
def test_values_past_their_bounds_are_named(section: str, key: str, value: object,
                                            message: str) -> None:
    assert problems_of(doc(**{section: {key: value}})) == [f"{section}.{key}: {message}"]


def test_a_safety_margin_as_big_as_the_capacity_is_one_problem() -> None:
    data = doc(devices={"cuda:0": {"capacity": "8GB", "safety_margin": "8GB"}})
    assert problems_of(data) == ["devices.cuda:0.safety_margin: leaves nothing of the capacity"]


def test_models_that_exactly_fill_a_device_fit() -> None:
    data = doc(
        devices={"cuda:0": {"capacity": "12GB", "safety_margin": "2GB"}},
        physical_models={
            "a": model(estimated_vram="4GB", pinned=True),
            "b": model(estimated_vram="6GB", pinned=True),
            "c": model(estimated_vram="10GB"),
        },
        virtual_models={},
    )
    assert set(parse_config(data).physical_models) == {"a", "b", "c"}


def test_pinned_models_on_another_device_do_not_count() -> None:
    data = doc(
        devices={"cuda:0": {"capacity": "10GB"}, "cuda:1": {"capacity": "10GB"}},
        physical_models={
            "a": model(estimated_vram="9GB", pinned=True, device="cuda:0"),
            "b": model(estimated_vram="9GB", pinned=True, device="cuda:1"),
        },
        virtual_models={},
    )
    assert set(parse_config(data).physical_models) == {"a", "b"}


def test_only_one_model_of_an_exclusive_group_may_be_pinned() -> None:
    data = doc(
        physical_models={
            "a": model(exclusive_group="big", pinned=True),
            "b": model(exclusive_group="big"),
            "c": model(exclusive_group="big", pinned=True),
        },
        virtual_models={},
    )
    assert problems_of(data) == [
        'physical_models.c.pinned: "a" of the same exclusive group is pinned already'
    ]


def test_a_physical_model_s_name_holds_no_slash_but_a_virtual_one_may() -> None:
    data = doc(physical_models={"acme/chat": model()},
               virtual_models={"acme/Chat": {"physical": "acme/chat"}})
    assert problems_of(data) == [
        "physical_models.acme/chat: a physical model's name may not hold '/': the admin "
        "routes (/admin/models/NAME/load) take it as one path segment (a virtual model's "
        "name may hold one)"
    ]
    data = doc(virtual_models={"acme/Chat": {"physical": "qwen3.5-4b"}})
    assert list(parse_config(data).virtual_models) == ["acme/Chat"]


def test_only_speech_models_have_voices() -> None:
    data = doc(physical_models={
        "speak": model(type="tts", backend="piper", voices={"alloy": "", "echo": "en-2"}),
        "qwen3.5-4b": model(voices={"alloy": ""}),
    })
    assert problems_of(data) == [
        "physical_models.qwen3.5-4b.voices: only speech (tts) models have voices, this is "
        "a chat model (llm)"
    ]


@pytest.mark.parametrize(
    ("sections", "problem"),
    [
        (  # not also "max_concurrency: the vllm backend serves one request at a time"
            {"physical_models": {"qwen3.5-4b": model(backend="vllm", max_concurrency=2)}},
            'physical_models.qwen3.5-4b.backend: unknown backend "vllm" (expected one of '
            "fake, llama_cpp, llama_server, transformers, faster_whisper, piper, chatterbox, "
            "rapidocr)",
        ),
        (  # not also "priority_class: unknown priority class"
            {"physical_models": {"qwen3.5-4b": model(type="chat")}},
            'physical_models.qwen3.5-4b.type: unknown type "chat" '
            "(expected one of llm, vlm, ocr, asr, tts, embedding, forecast)",
        ),
        (  # not also the model's priority class "urgent", which policy may well define
            {"policy": {"priority_classes": [1]},
             "physical_models": {"qwen3.5-4b": model(priority_class="urgent")}},
            "policy.priority_classes: expected a mapping, got a list",
        ),
        (  # not also "at least one device is required" or the model's "unknown device"
            {"devices": "cuda:0", "physical_models": {"qwen3.5-4b": model(device="cuda:0")}},
            'devices: expected a mapping, got "cuda:0"',
        ),
        (  # not also the model's "unknown device"
            {"devices": {"cuda:0": {"capacity": "lots"}},
             "physical_models": {"qwen3.5-4b": model(device="cuda:0")}},
            'devices.cuda:0.capacity: "lots" is not a size or "auto"',
        ),
        (  # not also "unknown physical model" for the virtual model naming it
            {"physical_models": {5: model()}, "virtual_models": {"v": {"physical": "5"}}},
            "physical_models.5: name must be a string, got 5",
        ),
    ],
)
def test_one_mistake_is_one_problem(sections: dict[str, Any], problem: str) -> None:
    assert problems_of(doc(**sections)) == [problem]


def test_a_problem_found_twice_is_listed_once() -> None:
    data = doc(physical_models={5: model(pinned="yes"), "5": model(pinned="yes")},
               virtual_models={})
    assert problems_of(data) == [
        "physical_models.5: name must be a string, got 5",
        'physical_models.5.pinned: expected a boolean, got "yes"',
    ]


@pytest.mark.parametrize(
    ("host", "metrics", "access"),
    [
        ("127.0.0.1", None, "open"),
        ("localhost", None, "open"),
        ("::1", None, "open"),
        ("[::1]", None, "open"),
        ("0.0.0.0", None, "admin"),
        ("192.168.1.20", None, "admin"),
        ("llmux.example.com", None, "admin"),
        ("127.0.0.1", "admin", "admin"),
        ("0.0.0.0", "open", "open"),
    ],
)
def test_metrics_are_open_on_a_loopback_bind_unless_configured(
    host: str, metrics: str | None, access: str
) -> None:
    server = parse_config(doc(server={"host": host, "metrics": metrics})).server
    assert server.metrics_access() == access


def test_summary_counts_models_per_device_and_shows_thinking_and_empty_tables() -> None:
    data = doc(
        devices={"cpu": {}, "cuda:0": {"capacity": "16GB"}},
        physical_models={"m": model(device="cuda:0")},
        virtual_models={"on": {"physical": "m", "enable_thinking": True},
                        "off": {"physical": "m", "enable_thinking": False},
                        "plain": {"physical": "m"}},
    )
    rows = [line.split() for line in render_summary(parse_config(data)).splitlines()]
    assert ["cpu", "auto", "0", "B", "0"] in rows
    assert ["cuda:0", "16.0", "GB", "0", "B", "1"] in rows
    assert {row[0]: row[2] for row in rows if row and row[0] in ("on", "off", "plain")} == {
        "on": "on", "off": "off", "plain": "-"}
    text = render_summary(parse_config(doc(virtual_models={})))
    assert text.endswith("Virtual models\n==============\n"
                         "NAME  PHYSICAL MODEL  THINKING  SYSTEM PROMPT PREFIX\n(none)\n")
