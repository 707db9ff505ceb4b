"""Property-based fuzzing of the request boundary: hypothesis drives the app in process (TestClient) with
JSON bodies full of lone surrogates, control characters and values of the wrong type. Whatever comes in,
the answer is never a 5xx, and every error has the documented shape (README, "Errors")."""

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from service.app import create_app
from service.settings import Settings

# Any code point a JSON string can carry, with the troublesome ones made common: lone surrogates,
# NUL and other control characters, a right-to-left override, a byte-order mark.
TROUBLESOME = ["\ud800", "\udfff", "\x00", "\x1b", "\x7f", "\u202e", "\ufeff"]
texts = st.text(st.sampled_from(TROUBLESOME) | st.characters(exclude_categories=()), max_size=12)
# Each field gets values of every JSON type, so that a lax parser's coercions would show.
values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-2, max_value=40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["16", "3", "yes", "no", "true", "float", "base64", "Left", "right", "query"]),
    texts,
    st.lists(texts, max_size=3),
    st.lists(st.integers(min_value=-2, max_value=2**40), max_size=3),  # token IDs, in range or not
    st.lists(st.lists(texts, max_size=3), max_size=2),  # /predict's batches, /decode's lists
    st.fixed_dictionaries({"source_sentence": texts, "sentences": st.lists(texts, max_size=2)}),
)
ROUTE_FIELDS = {
    "/": ["inputs", "raw_scores", "truncate", "truncation_direction"],
    "/embed": ["inputs", "normalize", "truncate", "truncation_direction", "prompt_name", "dimensions"],
    "/classify": ["inputs", "top_k", "raw_scores", "truncate", "truncation_direction"],
    "/predict": ["inputs", "raw_scores", "truncate", "truncation_direction"],
    "/similarity": ["inputs", "parameters"],
    "/tokenize": ["inputs", "add_special_tokens", "prompt_name"],
    "/decode": ["ids", "skip_special_tokens"],
    "/v1/embeddings": ["input", "model", "encoding_format", "dimensions", "user"],
    "/rerank": ["query", "texts", "raw_scores", "return_text", "truncate", "truncation_direction"],
    "/v1/rerank": ["query", "documents", "model", "top_n", "return_documents", "max_chunks_per_doc"],
    "/v2/rerank": ["query", "documents", "model", "top_n", "max_tokens_per_doc", "priority"],
}
RERANK_ROUTES = (
    "/rerank",
    "/v1/rerank",
    "/v2/rerank",
)  # served by the tiny reranker; the classifier refuses them
requests = st.sampled_from(sorted(ROUTE_FIELDS)).flatmap(
    lambda route: st.tuples(
        st.just(route),
        st.fixed_dictionaries({}, optional={field: values for field in ROUTE_FIELDS[route]}),
    )
)


@pytest.fixture(scope="module")
def client(tiny_bundle: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(bundle=tiny_bundle))) as client:
        yield client


@pytest.fixture(scope="module")
def rerank_client(tiny_rerank_bundle: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(bundle=tiny_rerank_bundle))) as client:
        yield client


def assert_documented_error(route: str, body: object) -> None:
    if route.startswith(("/v1/", "/v2/")):
        assert isinstance(body, dict) and set(body) == {"error"}
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    else:
        assert isinstance(body, dict) and set(body) == {"error", "error_type"}
        assert isinstance(body["error"], str) and body["error"]


# A few seconds on a loaded 2-core machine; derandomized, so a failure reproduces on every run.
@settings(max_examples=250, deadline=None, derandomize=True, database=None)
@given(request=requests)
def test_no_body_gets_a_server_error(
    client: TestClient, rerank_client: TestClient, request: tuple[str, dict[str, object]]
) -> None:
    route, payload = request
    client = rerank_client if route in RERANK_ROUTES else client
    # json.dumps escapes a lone surrogate as "\ud800": the bytes a hostile client would send.
    response = client.post(route, content=json.dumps(payload), headers={"content-type": "application/json"})
    assert response.status_code < 500, (response.status_code, response.text)
    if response.status_code != 200:
        assert response.status_code == 422, response.text
        assert_documented_error(route, response.json())
