"""/rerank (TEI's shape) and /v1/rerank (Cohere's and Jina's, through the official `cohere` client)
against a real uvicorn serving the tiny reranker bundle from the project's own export: scores equal
raw ONNX Runtime's on the pairs the tokenizer's template makes, in score order; the passage is cut,
never the query; the limits answer in the documented shapes."""

import asyncio
import math
from collections.abc import Iterator
from pathlib import Path

import cohere
import httpx
import numpy as np
import onnxruntime as ort
import pytest
from tokenizers import Tokenizer

from service.process import running_service

pytestmark = pytest.mark.e2e

QUERY = "the dog"
TEXTS = [
    "the dog sees the garden.",
    "a cat likes a wooden box.",
    "an old oak grows near the river bank.",
    "the hammer breaks a nail.",
    "a small fern covers some water.",
]


@pytest.fixture(scope="module")
def base_url(tiny_rerank_bundle: Path) -> Iterator[str]:
    # fp32, so that scores can be compared with raw ONNX Runtime exactly.
    with running_service(tiny_rerank_bundle, variant="fp32") as url:
        yield url


@pytest.fixture(scope="module")
def limited_url(tiny_rerank_bundle: Path) -> Iterator[str]:
    with running_service(
        tiny_rerank_bundle, max_client_batch=4, max_queue_items=4, max_payload_bytes=2048
    ) as url:
        yield url


def post(url: str, payload: object) -> httpx.Response:
    return httpx.post(url, json=payload, timeout=30, trust_env=False)


def pair_ids(bundle: Path, query: str, texts: list[str]) -> list[list[int]]:
    """The pairs as the graph must see them: the tokenizer's pair template, cut from the text only."""
    tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(32, strategy="only_second")
    return [encoding.ids for encoding in tokenizer.encode_batch([(query, text) for text in texts])]


def raw_logits(bundle: Path, query: str, texts: list[str]) -> np.ndarray:
    """One pair at a time through ONNX Runtime: no padding, no batching, nothing of the service."""
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = []
    for ids in pair_ids(bundle, query, texts):
        input_ids = np.array([ids], dtype=np.int64)
        outputs = session.run(["logits"], {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids)})
        logits.append(float(outputs[0][0, 0]))
    return np.array(logits)


def test_pairs_use_the_tokenizer_template_cls_query_sep_text_sep(tiny_rerank_bundle: Path) -> None:
    tokenizer = Tokenizer.from_file(str(tiny_rerank_bundle / "tokenizer.json"))
    (ids,) = pair_ids(tiny_rerank_bundle, QUERY, TEXTS[:1])
    query = tokenizer.encode(QUERY, add_special_tokens=False).ids
    text = tokenizer.encode(TEXTS[0], add_special_tokens=False).ids
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    assert ids == [cls, *query, sep, *text, sep]


def test_rerank_scores_are_onnx_runtime_sigmoids_best_first(base_url: str, tiny_rerank_bundle: Path) -> None:
    expected = raw_logits(tiny_rerank_bundle, QUERY, TEXTS)
    answer = post(f"{base_url}/rerank", {"query": QUERY, "texts": TEXTS})
    assert answer.status_code == 200, answer.text
    results = answer.json()
    assert sorted(result["index"] for result in results) == list(range(len(TEXTS)))
    assert all("text" not in result for result in results)
    scores = [result["score"] for result in results]
    assert scores == sorted(scores, reverse=True)
    assert len(set(scores)) == len(scores)  # the order is decided by the scores, not by ties
    for result in results:
        sigmoid = 1 / (1 + math.exp(-expected[result["index"]]))
        assert result["score"] == pytest.approx(sigmoid, abs=1e-5)

    raw = post(
        f"{base_url}/rerank", {"query": QUERY, "texts": TEXTS, "raw_scores": True, "return_text": True}
    )
    for result in raw.json():
        assert result["score"] == pytest.approx(expected[result["index"]], abs=1e-4)
        assert result["text"] == TEXTS[result["index"]]
    assert [result["index"] for result in raw.json()] == [result["index"] for result in results]


def test_root_route_answers_as_rerank_and_info_says_reranker(base_url: str) -> None:
    body = {"query": QUERY, "texts": TEXTS}
    assert post(base_url + "/", body).json() == post(f"{base_url}/rerank", body).json()
    info = httpx.get(f"{base_url}/info", trust_env=False).json()
    assert info["model_type"] == {"reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}}


def test_a_long_text_is_cut_never_the_query(base_url: str, tiny_rerank_bundle: Path) -> None:
    long_text = " ".join(["the dog sees the garden"] * 20)
    expected = raw_logits(tiny_rerank_bundle, QUERY, [long_text])[0]
    (result,) = post(f"{base_url}/rerank", {"query": QUERY, "texts": [long_text], "raw_scores": True}).json()
    assert result["score"] == pytest.approx(expected, abs=1e-4)

    refused = post(f"{base_url}/rerank", {"query": QUERY, "texts": [long_text], "truncate": False})
    assert refused.status_code == 422 and refused.json()["error_type"] == "Validation"
    assert "max_seq_len" in refused.json()["error"]

    long_query = post(f"{base_url}/rerank", {"query": long_text, "texts": ["a cat"]})
    assert long_query.status_code == 422, long_query.text
    assert long_query.json()["error_type"] == "Validation" and "query" in long_query.json()["error"]


@pytest.mark.parametrize(
    "body",
    [
        {"query": "", "texts": ["a cat"]},
        {"query": QUERY, "texts": []},
        {"query": QUERY, "texts": ["a cat", ""]},
        {"query": QUERY},
        {"query": QUERY, "texts": "a cat"},
    ],
)
def test_bad_bodies_are_422_in_teis_shape(base_url: str, body: dict[str, object]) -> None:
    answer = post(f"{base_url}/rerank", body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error_type"] == "Validation"


def test_embedding_routes_refuse_a_reranker(base_url: str) -> None:
    answer = post(f"{base_url}/embed", {"inputs": "a cat"})
    assert answer.status_code == 422 and "/rerank" in answer.json()["error"]
    openai = post(f"{base_url}/v1/embeddings", {"input": "a cat"})
    assert openai.status_code == 422 and "/rerank" in openai.json()["error"]["message"]


def test_limits_answer_413_and_422_in_their_shapes(limited_url: str) -> None:
    too_many = post(f"{limited_url}/rerank", {"query": QUERY, "texts": TEXTS})
    assert too_many.status_code == 422 and "max_client_batch" in too_many.json()["error"]
    too_large = post(f"{limited_url}/rerank", {"query": QUERY, "texts": ["word " * 500]})
    assert too_large.status_code == 413 and too_large.json()["error_type"] == "PayloadTooLarge"
    cohere_too_many = post(f"{limited_url}/v1/rerank", {"query": QUERY, "documents": TEXTS})
    assert cohere_too_many.status_code == 422
    assert cohere_too_many.json()["error"]["code"] == "Validation"


def test_cohere_client_reranks_unchanged(base_url: str) -> None:
    tei = {
        result["index"]: result["score"]
        for result in post(f"{base_url}/rerank", {"query": QUERY, "texts": TEXTS}).json()
    }
    client = cohere.Client(api_key="unused", base_url=base_url, httpx_client=httpx.Client(trust_env=False))
    response = client.rerank(model="tiny", query=QUERY, documents=TEXTS, top_n=3, return_documents=True)
    assert len(response.results) == 3
    best_three = sorted(tei, key=lambda index: -tei[index])[:3]
    assert [result.index for result in response.results] == best_three
    for result in response.results:
        assert result.relevance_score == pytest.approx(tei[result.index], abs=1e-6)
        assert result.document is not None and result.document.text == TEXTS[result.index]

    documents = [{"text": text} for text in TEXTS]
    plain = client.rerank(model="tiny", query=QUERY, documents=documents)
    assert [result.index for result in plain.results] == sorted(tei, key=lambda index: -tei[index])
    assert all(result.document is None for result in plain.results)


def test_cohere_v2_client_reranks_unchanged(base_url: str) -> None:
    tei = {
        result["index"]: result["score"]
        for result in post(f"{base_url}/rerank", {"query": QUERY, "texts": TEXTS}).json()
    }
    client = cohere.ClientV2(api_key="unused", base_url=base_url, httpx_client=httpx.Client(trust_env=False))
    response = client.rerank(model="tiny", query=QUERY, documents=TEXTS, top_n=2, max_tokens_per_doc=512)
    assert [result.index for result in response.results] == sorted(tei, key=lambda index: -tei[index])[:2]
    for result in response.results:
        assert result.relevance_score == pytest.approx(tei[result.index], abs=1e-6)
    unknown = post(f"{base_url}/v2/rerank", {"model": "nope", "query": QUERY, "documents": TEXTS})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    objects = post(f"{base_url}/v2/rerank", {"query": QUERY, "documents": [{"text": TEXTS[0]}]})
    assert objects.status_code == 422 and objects.json()["error"]["param"] == "documents"


@pytest.mark.parametrize(
    ("route", "body", "shape"),
    [
        ("/rerank", {"query": QUERY, "texts": TEXTS[:4]}, "tei"),
        ("/v1/rerank", {"query": QUERY, "documents": TEXTS[:4]}, "openai"),
        ("/v2/rerank", {"query": QUERY, "documents": TEXTS[:4]}, "openai"),
    ],
)
def test_a_full_queue_answers_429_in_the_routes_shape(
    limited_url: str, route: str, body: dict[str, object], shape: str
) -> None:
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(
            timeout=30, limits=httpx.Limits(max_connections=48), trust_env=False
        ) as client:
            return await asyncio.gather(*(client.post(limited_url + route, json=body) for _ in range(48)))

    responses = asyncio.run(burst())
    statuses = [response.status_code for response in responses]
    assert set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses, statuses
    overloaded = next(response for response in responses if response.status_code == 429)
    assert overloaded.headers["retry-after"].isdigit()
    if shape == "tei":
        assert overloaded.json()["error_type"] == "Overloaded"
    else:
        assert overloaded.json()["error"]["type"] == "rate_limit_error", overloaded.text
    assert post(limited_url + route, body).status_code == 200
