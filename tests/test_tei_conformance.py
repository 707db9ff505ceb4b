"""TEI conformance, checked against TEI's own published API (tests/tei_openapi.py, written from TEI
1.9.3's OpenAPI document). For every POST route that TEI defines and this service serves, hypothesis
generates bodies that TEI's request schema calls valid. Each must be answered 200 with a body valid
under TEI's response schema (and of the right size), unless it breaks one of the service's documented
limits (`refusals`, the test's own statement of them): then 422, in the documented error shape, with
a message that names the limit. A valid shape is never refused for its shape, and nothing is a 5xx.

In process (TestClient) on the tiny bundle with prompts (/rerank: on the tiny reranker bundle),
derandomized: seconds in CI.
"""

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema_rs
import numpy as np
import pytest
from conftest import TINY_DEFAULT_PROMPT, TINY_LABELS, TINY_PROMPTS
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tei_openapi import ERROR_RESPONSE, INFO, INT32_MAX, POST_ROUTES, Schema
from tokenizers import Tokenizer

from service.app import create_app
from service.settings import Settings

# Words the tiny tokenizer was trained on, so that texts become real tokens, and long texts exist.
WORDS = ["the", "dog", "sees", "a", "cat", "an", "old", "oak", "grows", "near", "river", "bank", "hammer"]
texts = st.one_of(
    st.lists(st.sampled_from(WORDS), max_size=12).map(" ".join),
    st.lists(st.sampled_from(WORDS), min_size=30, max_size=40).map(" ".join),  # over max_seq_len tokens
    st.text(st.characters(exclude_categories=("Cs",)), max_size=20),  # any Unicode text, "" included
)
# Values for fields whose schema is only "a string": the model's prompt names are what matter.
FIELD_VALUES = {"prompt_name": st.sampled_from([None, "query", "passage", "unknown"])}


def strategy(schema: Schema, field: str | None = None) -> st.SearchStrategy[Any]:
    """Values for the JSON Schema subset that tests/tei_openapi.py uses (not filtered by oneOf: the
    caller keeps only the values the whole schema accepts)."""
    if field in FIELD_VALUES:
        return FIELD_VALUES[field]
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "oneOf" in schema:
        return st.one_of([strategy(branch) for branch in schema["oneOf"]])
    if isinstance(schema["type"], list):
        return st.one_of([strategy(schema | {"type": kind}, field) for kind in schema["type"]])
    kind = schema["type"]
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        low, high = schema.get("minimum", 0), schema.get("maximum", INT32_MAX)
        # Mostly small (token IDs in the tiny vocabulary, dimensions within the model's), sometimes any.
        return st.one_of(st.integers(low, min(high, low + 150)), st.integers(low, high))
    if kind == "number":
        return st.floats(allow_nan=False, allow_infinity=False)
    if kind == "string":
        return texts
    if kind == "array":
        size = {"min_size": schema.get("minItems", 0), "max_size": min(schema.get("maxItems", 4), 4)}
        return st.lists(strategy(schema["items"], field), **size)
    properties = schema.get("properties", {})
    required = schema.get("required", [])
    return st.fixed_dictionaries(
        {name: strategy(properties[name], name) for name in required},
        optional={name: strategy(value, name) for name, value in properties.items() if name not in required},
    )


@dataclass(frozen=True)
class Model:
    """What the oracle needs to know of the served bundle, read from its files, not from the service."""

    tokenizer: Tokenizer  # uncut
    vocab_size: int
    dim: int
    max_seq_len: int

    def too_long(self, item: Any, prompt: str) -> bool:
        if isinstance(item, list) and all(isinstance(token_id, int) for token_id in item):
            return len(item) > self.max_seq_len  # token IDs: as given, no prompt
        encoding = (
            self.tokenizer.encode(prompt + item) if isinstance(item, str) else self.tokenizer.encode(*item)
        )
        return len(encoding.ids) > self.max_seq_len


def is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, int) for item in value)


def embed_items(inputs: Any) -> list[Any]:
    return [inputs] if isinstance(inputs, str) or is_token_ids(inputs) else inputs


def predict_items(inputs: Any) -> tuple[list[Any], bool]:
    if isinstance(inputs, str):
        return [inputs], True
    if inputs and isinstance(inputs[0], str):
        return [tuple(inputs)], True
    return [item[0] if len(item) == 1 else tuple(item) for item in inputs], False


def texts_in(item: Any) -> list[str]:
    return [item] if isinstance(item, str) else list(item) if isinstance(item, tuple) else []


# The words each limit's 422 message contains (README, "Errors").
LIMIT_WORDS = {
    "empty": "empty",
    "vocabulary": "vocabulary",
    "dimensions": "dimensions",
    "prompt": "prompt_name",
    "too long": "max_seq_len",
    "query too long": "query",
}


def refusals(route: str, body: dict[str, Any], model: Model) -> set[str]:
    """The documented limits that `body` breaks (empty when it must be served)."""
    found: set[str] = set()
    options = (body.get("parameters") or {}) if route == "/similarity" else body
    prompt_name = options.get("prompt_name")
    if prompt_name is not None and prompt_name not in TINY_PROMPTS:
        found.add("prompt")
    prompt = TINY_PROMPTS.get(prompt_name or TINY_DEFAULT_PROMPT, "")
    if route in ("/embed", "/v1/embeddings"):
        items = embed_items(body["inputs" if route == "/embed" else "input"])
        dimensions = body.get("dimensions")
        if dimensions is not None and not 1 <= dimensions <= model.dim:
            found.add("dimensions")
    elif route == "/predict":
        items, _ = predict_items(body["inputs"])
        prompt = ""  # prompts are for embeddings
    elif route == "/similarity":
        items = [body["inputs"]["source_sentence"], *body["inputs"]["sentences"]]
        if not body["inputs"]["sentences"]:
            found.add("empty")
    elif route == "/rerank":
        prompt = ""  # a reranker has no prompts
        query, texts = body["query"], body["texts"]
        if query == "" or not texts or "" in texts:
            return found | {"empty"}
        if len(model.tokenizer.encode(query, "").ids) >= model.max_seq_len:
            return found | {"query too long"}  # a query is never cut
        items = [(query, text) for text in texts]
    elif route == "/tokenize":
        inputs = body["inputs"]
        return found | ({"empty"} if inputs == [] else set())  # "" is fine: the special tokens alone
    else:  # /decode
        items = [body["ids"]] if is_token_ids(body["ids"]) else body["ids"]
    if not items or any(item in ("", []) or "" in texts_in(item) for item in items):
        found.add("empty")
    if any(is_token_ids(item) and max(item) >= model.vocab_size for item in items):
        found.add("vocabulary")
    cut = route == "/decode" or options.get("truncate") is not False
    if not cut and "empty" not in found and any(model.too_long(item, prompt) for item in items):
        found.add("too long")
    return found


def check_served(route: str, body: dict[str, Any], answer: Any, model: Model) -> None:
    """Beyond the schema: one answer per input, of the size the request asked for."""
    if route == "/embed":
        rows = np.array(answer)
        assert rows.shape == (len(embed_items(body["inputs"])), body.get("dimensions") or model.dim)
        if body.get("normalize", True):  # TEI's default, whatever the model
            np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1, atol=1e-4)
    elif route == "/v1/embeddings":
        assert len(answer["data"]) == len(embed_items(body["input"]))
    elif route == "/predict":
        items, single = predict_items(body["inputs"])
        batch = [answer] if single else answer
        assert len(batch) == len(items)
        for predictions in batch:
            assert sorted(prediction["label"] for prediction in predictions) == sorted(TINY_LABELS)
            scores = [prediction["score"] for prediction in predictions]
            assert scores == sorted(scores, reverse=True)
    elif route == "/similarity":
        assert len(answer) == len(body["inputs"]["sentences"])
        assert all(-1.0001 <= value <= 1.0001 for value in answer)
    elif route == "/rerank":
        assert sorted(result["index"] for result in answer) == list(range(len(body["texts"])))
        scores = [result["score"] for result in answer]
        assert scores == sorted(scores, reverse=True)
        assert body.get("raw_scores", False) or all(0 <= score <= 1 for score in scores)
        for result in answer:
            assert result.get("text") == (body["texts"][result["index"]] if body.get("return_text") else None)
    elif route == "/tokenize":
        inputs = body["inputs"]
        assert len(answer) == (1 if isinstance(inputs, str) else len(inputs))
    else:
        assert len(answer) == (1 if is_token_ids(body["ids"]) else len(body["ids"]))


@pytest.fixture(scope="module")
def client(tiny_bundle_with_prompts: Path) -> Iterator[TestClient]:
    settings = Settings(bundle=tiny_bundle_with_prompts, variant="fp32")
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture(scope="module")
def rerank_client(tiny_rerank_bundle: Path) -> Iterator[TestClient]:
    settings = Settings(bundle=tiny_rerank_bundle, variant="fp32")
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture(scope="module")
def model(tiny_bundle_with_prompts: Path) -> Model:
    manifest = json.loads((tiny_bundle_with_prompts / "manifest.json").read_text())
    tokenizer = Tokenizer.from_file(str(tiny_bundle_with_prompts / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    vocab_size = min(tokenizer.get_vocab_size(with_added_tokens=True), manifest["architecture"]["vocab_size"])
    return Model(tokenizer, vocab_size, manifest["embedding"]["dim"], manifest["max_seq_len"])


def valid(schema: Schema, instance: Any) -> bool:
    return jsonschema_rs.validator_for(schema).is_valid(instance)


# Bodies TEI's schema calls valid, per route; derandomized, so that a failure reproduces on every run.
@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow],
)
@pytest.mark.parametrize("route", sorted(POST_ROUTES))
@given(data=st.data())
def test_valid_requests_are_served_in_teis_shapes(
    client: TestClient, rerank_client: TestClient, model: Model, route: str, data: st.DataObject
) -> None:
    # The tiny reranker shares the tiny bundle's tokenizer and max_seq_len, so `model` holds for both.
    client = rerank_client if route == "/rerank" else client
    request_schema, response_schema = POST_ROUTES[route]
    body = data.draw(strategy(request_schema).filter(lambda value: valid(request_schema, value)), "body")
    if route == "/v1/embeddings" and "model" in body:
        # TEI ignores the OpenAI `model` field; this service routes by it, and an unknown name is a 404
        # (tests/test_service_multimodel.py), so a valid request names the served model.
        body["model"] = "tiny"
    response = client.post(route, content=json.dumps(body), headers={"content-type": "application/json"})
    expected_refusals = refusals(route, body, model)
    event(
        f"refused: {sorted(expected_refusals)}" if expected_refusals else "served"
    )  # --hypothesis-show-statistics
    if not expected_refusals:
        assert response.status_code == 200, response.text
        answer = response.json()
        assert valid(response_schema, answer), answer
        check_served(route, body, answer, model)
        return
    assert response.status_code == 422, (expected_refusals, response.status_code, response.text)
    error = response.json()
    if route.startswith("/v1/"):  # OpenAI's error shape there, on purpose (README, "Errors")
        assert set(error) == {"error"} and error["error"]["code"] == "Validation"
        message = error["error"]["message"]
    else:
        assert valid(ERROR_RESPONSE, error) and error["error_type"] == "Validation", error
        message = error["error"]
    assert any(LIMIT_WORDS[limit] in message for limit in expected_refusals), (expected_refusals, message)


def test_info_has_teis_fields(client: TestClient) -> None:
    info = client.get("/info").json()
    assert valid(INFO, info), info
    assert info["model_type"] == {
        "classifier": {
            "id2label": {str(index): label for index, label in enumerate(TINY_LABELS)},
            "label2id": {label: index for index, label in enumerate(TINY_LABELS)},
        }
    }
    assert info["model_dtype"] == "float32" and info["max_input_length"] == 32 and info["auto_truncate"]
    assert info["labels"] == TINY_LABELS and info["batching"]["max_client_batch"] == 1024  # ours, kept
    assert info["prompts"] == TINY_PROMPTS and info["default_prompt_name"] == TINY_DEFAULT_PROMPT
    assert client.get("/health").status_code == 200
    assert client.get("/metrics").status_code == 200
