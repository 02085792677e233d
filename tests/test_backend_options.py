"""Every backend's options are checked with the config: an unknown name or a bad value
is listed by path with the config's other problems and stops start-up, instead of
failing the model's first load (or being silently ignored). A worker checks them again
before it builds the backend. (faster_whisper's own table: test_faster_whisper_options.)"""

from __future__ import annotations

from typing import Any

import pytest

from llmux.backends.options import TABLES, check_options, option_problems
from llmux.chat.output import REASONING_FORMATS, TOOL_FORMATS
from llmux.config import ConfigError, parse_config


def config(backend: str, model_type: str, device: str = "cpu", **options: Any
           ) -> dict[str, Any]:
    devices = {"cpu": {}} if device == "cpu" else {device: {"capacity": "16GB"}}
    return {
        "devices": devices,
        "physical_models": {"m": {"type": model_type, "backend": backend,
                                  "estimated_vram": "100MB", "options": options}},
        "virtual_models": {"m": {"physical": "m"}},
    }


def problems_of(data: object) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    return [problem.removeprefix("physical_models.m.options.")
            for problem in caught.value.problems]


@pytest.mark.parametrize(("backend", "model_type", "device", "options"), [
    ("llama_cpp", "llm", "cpu", {
        "n_ctx": 8192, "n_gpu_layers": 0, "n_batch": 256, "n_threads": 2,
        "flash_attn": "auto", "type_k": "Q8_0", "type_v": "q4_0", "chat_template": "{{x}}",
        "embedding": False, "pooling": "mean", "verbose": True, "mmproj": "pkg:a/b.gguf",
        "reasoning_format": "think", "tool_format": "hermes"}),
    ("llama_cpp", "llm", "cuda:0", {"n_gpu_layers": 20, "type_v": "q8_0",
                                    "flash_attn": True}),
    ("llama_cpp", "llm", "cpu", {"n_ctx": None, "n_threads": None}),
    # null is "auto": on the cpu, flash attention, so a quantised V cache is fine
    ("llama_cpp", "llm", "cpu", {"flash_attn": None, "type_v": "q8_0"}),
    # an unquantised V cache needs no flash attention
    ("llama_cpp", "llm", "cuda:0", {"type_v": "F16", "flash_attn": False}),
    ("llama_server", "llm", "cuda:0", {"type_v": "bf16"}),
    ("llama_server", "llm", "cpu", {"binary": "/usr/bin/llama-server",
                                    "extra_args": ["--jinja"], "flash_attn": False}),
    ("llama_server", "embedding", "cuda:1", {"n_gpu_layers": -1, "embedding": True}),
    ("piper", "tts", "cpu", {"cpu_threads": 0, "length_scale": 1.2, "noise_scale": None}),
    ("chatterbox", "tts", "cpu", {"variant": "turbo", "exaggeration": 0.5,
                                  "cfg_weight": 0, "temperature": 0.8}),
    ("chatterbox", "tts", "cpu", {"exaggeration": 0}),
    ("rapidocr", "ocr", "cpu", {"text_score": 0, "box_thresh": 0.0}),
    ("rapidocr", "ocr", "cpu", {"text_score": 0.3, "box_thresh": 1, "unclip_ratio": 2,
                                "use_angle_cls": False, "intra_op_num_threads": 0,
                                "max_side_len": 1024, "rec_keys_path": "keys.txt"}),
    ("transformers", "llm", "cpu", {"dtype": "bfloat16", "gguf_file": "m.gguf",
                                    "context_length": 2048, "max_new_tokens": None,
                                    "reasoning_format": "none"}),
    ("transformers", "vlm", "cuda:0", {"device_map": "auto", "min_pixels": 3136,
                                       "max_pixels": 200704, "attn_implementation": "sdpa"}),
    ("transformers", "asr", "cpu", {"language": "de", "max_new_tokens": 100}),
    ("transformers", "embedding", "cpu", {"max_length": 256, "batch_size": 8,
                                          "trust_remote_code": False}),
    ("transformers", "forecast", "cpu", {"batch_size": 4, "truncate": True,
                                         "fix_quantile_crossing": False,
                                         "device_map": {"": "cpu"}}),
    ("fake", "llm", "cpu", {"anything": "goes", "reply": 3}),  # a test's script
])
def test_good_options_pass(backend: str, model_type: str, device: str,
                           options: dict[str, Any]) -> None:
    model = parse_config(config(backend, model_type, device, **options)).physical_models["m"]
    assert model.options == options


def test_every_bad_llama_option_is_named_with_its_rule() -> None:
    assert problems_of(config(
        "llama_cpp", "llm", n_ctx="4k", n_batch=0, flash_attn="yes", type_k="q3_k",
        pooling="max", embedding=1, mmproj=None, reasoning_format="deepseek",
        flash_atn=True)) == [
        'n_ctx: expected an integer, got "4k"',
        "n_batch: must be at least 1",
        'flash_attn: expected true, false or "auto", got "yes"',
        'type_k: expected one of f32, f16, bf16, q8_0, q4_0, q4_1, iq4_nl, q5_0, q5_1, '
        'got "q3_k"',
        'pooling: expected one of none, mean, cls, last, got "max"',
        "embedding: expected a boolean, got 1",
        "mmproj: expected a string, got null",
        'reasoning_format: expected one of auto, none, think, harmony, got "deepseek"',
        "flash_atn: unknown option, did you mean flash_attn? (llama_cpp takes chat_template, "
        "embedding, flash_attn, "
        "mmproj, n_batch, n_ctx, n_gpu_layers, n_threads, pooling, reasoning_format, "
        "tool_format, type_k, type_v, verbose)",
    ]


@pytest.mark.parametrize(("backend", "device", "options", "problem"), [
    ("llama_cpp", "cpu", {"n_gpu_layers": -1},
     "n_gpu_layers: -1 layers on the GPU, but this model is placed on cpu: only 0 is "
     "possible there"),
    ("llama_server", "cpu", {"n_gpu_layers": 10},
     "n_gpu_layers: 10 layers on the GPU, but this model is placed on cpu: only 0 is "
     "possible there"),
    # llama_cpp's "auto" is off on a GPU; llama-server's own "auto" may be off anywhere
    ("llama_cpp", "cuda:0", {"type_v": "q8_0"},
     "type_v: a quantised V cache (q8_0) needs flash_attn: true"),
    ("llama_cpp", "cpu", {"type_v": "Q4_0", "flash_attn": False},
     "type_v: a quantised V cache (Q4_0) needs flash_attn: true"),
    ("llama_server", "cpu", {"type_v": "q4_0"},
     "type_v: a quantised V cache (q4_0) needs flash_attn: true"),
    ("llama_server", "cpu", {"extra_args": "--jinja"},
     'extra_args: expected a list of strings, got "--jinja"'),
])
def test_the_gguf_backends_rules_across_options_and_the_device(
        backend: str, device: str, options: dict[str, Any], problem: str) -> None:
    assert problems_of(config(backend, "llm", device, **options)) == [problem]


@pytest.mark.parametrize(("backend", "model_type", "options", "problem"), [
    ("rapidocr", "ocr", {"lang": "en"}, "lang: unknown option (rapidocr takes box_thresh, "
     "cls_model_path, det_limit_side_len, det_model_path, inter_op_num_threads, "
     "intra_op_num_threads, max_side_len, rec_keys_path, rec_model_path, text_score, "
     "unclip_ratio, use_angle_cls, use_cls)"),
    ("rapidocr", "ocr", {"text_score": 1.5}, "text_score: must be from 0 to 1"),
    ("rapidocr", "ocr", {"use_cls": "yes"}, 'use_cls: expected a boolean, got "yes"'),
    ("rapidocr", "ocr", {"intra_op_num_threads": -2},
     "intra_op_num_threads: must not be negative"),
    ("rapidocr", "ocr", {"max_side_len": 16}, "max_side_len: must be at least 32"),
    ("piper", "tts", {"length_scale": 0}, "length_scale: must be positive"),
    ("piper", "tts", {"cpu_threads": "2"}, 'cpu_threads: expected an integer, got "2"'),
    ("chatterbox", "tts", {"variant": "fast"},
     'variant: expected one of default, multilingual, turbo, got "fast"'),
    ("chatterbox", "tts", {"cfg_weight": "high"}, 'cfg_weight: expected a number, got '
                                                  '"high"'),
    ("chatterbox", "tts", {"temperature": 0}, "temperature: must be positive"),
    ("rapidocr", "ocr", {"box_thresh": -0.1}, "box_thresh: must be from 0 to 1"),
    # only the KV cache types are taken in any case
    ("transformers", "llm", {"dtype": "BFloat16"},
     'dtype: expected one of auto, float32, bfloat16, float16, got "BFloat16"'),
    # a value that is not a string is refused, not lower-cased
    ("llama_cpp", "llm", {"type_k": 8},
     "type_k: expected one of f32, f16, bf16, q8_0, q4_0, q4_1, iq4_nl, q5_0, q5_1, got 8"),
    ("llama_cpp", "llm", {"pooling": "MEAN"},
     'pooling: expected one of none, mean, cls, last, got "MEAN"'),
    ("transformers", "llm", {"dtype": "fp16"},
     'dtype: expected one of auto, float32, bfloat16, float16, got "fp16"'),
    ("transformers", "vlm", {"max_pixels": "lots"}, 'max_pixels: expected an integer, got '
                                                    '"lots"'),
    ("transformers", "embedding", {"batch_size": 0}, "batch_size: must be at least 1"),
    ("transformers", "forecast", {"truncate": "yes"}, 'truncate: expected a boolean, got '
                                                      '"yes"'),
    # an option of another type of model is unknown to this one
    ("transformers", "embedding", {"min_pixels": 100}, "min_pixels: unknown option "
     "(transformers takes attn_implementation, batch_size, device_map, dtype, gguf, "
     "gguf_file, max_length, trust_remote_code)"),
])
def test_a_bad_option_is_a_config_problem(backend: str, model_type: str,
                                          options: dict[str, Any], problem: str) -> None:
    assert problems_of(config(backend, model_type, **options)) == [problem]


def test_a_worker_refuses_bad_options_before_it_builds_the_backend() -> None:
    spec = {"backend": "llama_server", "type": "llm", "device": "cpu",
            "options": {"n_ctx": 8, "extra_args": ["-v", 1]}}
    with pytest.raises(ValueError, match=r"^option n_ctx: must be at least 16; option "
                                         r"extra_args: expected a list of strings, got a "
                                         r"list$"):
        check_options(spec)
    check_options({**spec, "options": {"n_ctx": 16}})


def test_a_worker_checks_the_options_against_its_model_s_device() -> None:
    spec = {"backend": "llama_cpp", "type": "llm", "options": {"n_gpu_layers": 20}}
    check_options({**spec, "device": "cuda:0"})
    for device in ({"device": "cpu"}, {"device": None}, {}):
        with pytest.raises(ValueError, match=r"^option n_gpu_layers: 20 layers on the GPU, "
                                             r"but this model is placed on cpu: "):
            check_options({**spec, **device})


def test_the_formats_are_those_the_reply_parser_knows() -> None:
    for table in TABLES.values():
        if "reasoning_format" in table:
            for name in REASONING_FORMATS:
                assert not list(table["reasoning_format"](name))
            for name in TOOL_FORMATS:
                assert not list(table["tool_format"](name))


def test_the_fake_backend_takes_any_option() -> None:
    assert option_problems("fake", "llm", {"whatever": object()}) == []


def test_an_unknown_device_is_one_problem_not_also_the_gpu_layers() -> None:
    data = config("llama_cpp", "llm", "cuda:0", n_gpu_layers=10, type_v="q8_0")
    data["physical_models"]["m"]["device"] = "gpu0"
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    assert caught.value.problems == ['physical_models.m.device: unknown device "gpu0"']
