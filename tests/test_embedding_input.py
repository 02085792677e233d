"""``POST /v1/embeddings`` refuses an empty text as OpenAI does ("cannot be an empty
string"), through the openai SDK against a live server with a fake embedding model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from llmux.errors import BadRequest
from llmux.http.embeddings import MAX_INPUTS, parse_input
from tests.conftest import Server, fake_model, sdk_client, serving

CONFIG: dict[str, Any] = {
    "devices": {"cpu": {"capacity": "1GB"}},
    "physical_models": {"embedder": fake_model(embedding_dim=8) | {"type": "embedding"}},
    "virtual_models": {"embed": {"physical": "embedder"}},
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(json.loads(json.dumps(CONFIG)), tmp_path_factory.mktemp("embed")) as server:
        yield server


@pytest.fixture
def client(server: Server) -> Iterator[openai.OpenAI]:
    with sdk_client(server) as c:
        yield c


def refusal(client: openai.OpenAI, texts: str | list[str]) -> dict[str, Any]:
    """The error object of the 400 an embedding request for ``texts`` gets."""
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="embed", input=texts, encoding_format="float")
    error: dict[str, Any] = caught.value.response.json()["error"]
    return error


def test_an_empty_string_is_refused_with_param_input(client: openai.OpenAI) -> None:
    error = refusal(client, "")
    assert error["message"] == "'input' cannot be an empty string; send text to embed."
    assert (error["type"], error["param"]) == ("invalid_request_error", "input")


def test_an_empty_string_in_a_list_is_refused_naming_its_item(client: openai.OpenAI) -> None:
    error = refusal(client, ["alpha", "", "beta"])
    assert error["message"] == "'input[1]' cannot be an empty string; send text to embed."
    assert error["param"] == "input"


def test_texts_with_something_in_them_are_embedded(client: openai.OpenAI) -> None:
    reply = client.embeddings.create(model="embed", input=["alpha", " "],
                                     encoding_format="float")
    assert [len(d.embedding) for d in reply.data] == [8, 8]


@pytest.mark.parametrize(("extra", "param", "contains"), [
    ({"encoding_format": "hex"}, "encoding_format", "must be float or base64"),
    ({"encoding_format": 1}, "encoding_format", "must be a string"),
    ({"dimensions": "8"}, "dimensions", "must be an integer"),
    ({"dimensions": True}, "dimensions", "must be an integer"),
    ({"dimensions": 0}, "dimensions", "between 1 and 65536"),
    ({"dimensions": 4}, "dimensions", "cannot shorten them to 4"),
])
def test_embedding_options_out_of_range_get_a_400(client: openai.OpenAI,
                                                  extra: dict[str, Any], param: str,
                                                  contains: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="embed", input="x", extra_body=extra)
    error: dict[str, Any] = caught.value.response.json()["error"]
    assert error["param"] == param and contains in error["message"]


def test_the_dimensions_the_model_makes_are_accepted(client: openai.OpenAI) -> None:
    reply = client.embeddings.create(model="embed", input="x", dimensions=8,
                                     encoding_format="float")
    assert len(reply.data[0].embedding) == 8


def test_a_reply_gives_each_vector_in_input_order_and_counts_the_tokens(
        client: openai.OpenAI) -> None:
    """``data[i]`` is the vector of ``input[i]`` (Open WebUI ignores ``index``), and
    ``total_tokens`` equals ``prompt_tokens``."""
    texts = ["one two", "three", "four"]
    reply = client.embeddings.create(model="embed", input=texts, encoding_format="float")
    assert [d.index for d in reply.data] == [0, 1, 2]
    alone = [client.embeddings.create(model="embed", input=text, encoding_format="float")
             .data[0].embedding for text in texts]
    assert [d.embedding for d in reply.data] == alone
    assert reply.model == "embed"
    assert (reply.usage.prompt_tokens, reply.usage.total_tokens) == (4, 4)


# -- parse_input on its own ----------------------------------------------------------------


def test_up_to_max_inputs_texts_are_taken() -> None:
    """The limit is the most texts allowed; one more is refused, naming the count."""
    assert len(parse_input({"input": ["x"] * MAX_INPUTS})) == MAX_INPUTS
    with pytest.raises(BadRequest, match=f"at most {MAX_INPUTS} texts, got {MAX_INPUTS + 1}"):
        parse_input({"input": ["x"] * (MAX_INPUTS + 1)})


@pytest.mark.parametrize("value", [["a", 1], ["a", None], ["a", ["b"]], {"a": 1}, 3, None, []])
def test_anything_but_strings_is_refused(value: Any) -> None:
    """Every item must be a string: one text among other things is no excuse."""
    with pytest.raises(BadRequest, match="must be a string or a non-empty list of strings"):
        parse_input({"input": value})


@pytest.mark.parametrize("value", [[1, 2, 3], [[1, 2], [3]]])
def test_token_ids_are_refused_by_name(value: list[Any]) -> None:
    with pytest.raises(BadRequest, match="'input' as token ids is not supported"):
        parse_input({"input": value})
