"""TEI's inputs, fields and routes beyond /embed and /classify, end to end on a real uvicorn with the
tiny bundles: token-ID inputs, prompts, truncation_direction, /predict, /similarity, /tokenize,
/decode, POST / for each kind of model, and Hugging Face's own InferenceClient pointed at the service.
Answers are compared with raw ONNX Runtime on the bundle's fp32 graph."""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from conftest import TINY_LABELS
from tokenizers import Tokenizer

from service.process import running_service

pytestmark = pytest.mark.e2e

TEXTS = ["the dog sees the garden.", "a cat", "an old oak grows near the river bank and covers a wooden box."]
# Over max_seq_len (32) tokens, and its start differs from its end (for truncation_direction).
LONG_TEXT = (
    "a small fern grows near the river bank, " + "the hammer breaks a nail " * 12 + "and the dog sees it."
)


class Reference:
    """Raw ONNX Runtime on the fp32 graph, one input at a time, and the bundle's tokenizer uncut."""

    def __init__(self, bundle: Path) -> None:
        self.max_seq_len = json.loads((bundle / "manifest.json").read_text())["max_seq_len"]
        self.tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
        self.outputs = [output.name for output in self.session.get_outputs()]

    def ids(self, text: str | tuple[str, str], side: str = "right") -> list[int]:
        self.tokenizer.enable_truncation(self.max_seq_len, direction=side)
        try:
            return (
                self.tokenizer.encode(*text).ids
                if isinstance(text, tuple)
                else self.tokenizer.encode(text).ids
            )
        finally:
            self.tokenizer.no_truncation()

    def run(self, ids: list[int]) -> dict[str, np.ndarray]:
        input_ids = np.array([ids], dtype=np.int64)
        outputs = self.session.run(None, {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids)})
        return {name: value[0] for name, value in zip(self.outputs, outputs, strict=True)}

    def embeddings(self, inputs: list[Any], side: str = "right") -> np.ndarray:
        return np.array(
            [
                self.run(item if isinstance(item, list) else self.ids(item, side))["embedding"]
                for item in inputs
            ]
        )

    def logits(self, inputs: list[Any]) -> np.ndarray:
        return np.array(
            [self.run(item if isinstance(item, list) else self.ids(item))["logits"] for item in inputs]
        )


def unit(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.linalg.norm(matrix, axis=-1, keepdims=True)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def post(url: str, payload: object) -> httpx.Response:
    return httpx.post(url, json=payload, timeout=30)


def assert_422(response: httpx.Response, *words: str) -> str:
    assert response.status_code == 422, response.text
    body = response.json()
    message = body["error"]["message"] if response.request.url.path.startswith("/v1/") else body["error"]
    if not response.request.url.path.startswith("/v1/"):
        assert body["error_type"] == "Validation"
    for word in words:
        assert word in message, message
    return message


@pytest.fixture(scope="module")
def classifier(tiny_bundle: Path) -> Iterator[tuple[str, Reference]]:
    """The 3-label classifier bundle (a classifier to TEI), fp32 for exact comparisons."""
    with running_service(tiny_bundle, variant="fp32") as url:
        yield url, Reference(tiny_bundle)


@pytest.fixture(scope="module")
def embedder(tiny_embedder_with_prompts: Path) -> Iterator[tuple[str, Reference]]:
    """The embedding-only bundle with prompts ("query" the default), at most 4 inputs per request."""
    with running_service(tiny_embedder_with_prompts, variant="fp32", max_client_batch=4) as url:
        yield url, Reference(tiny_embedder_with_prompts)


def test_token_ids_are_inputs_like_texts(classifier: tuple[str, Reference]) -> None:
    url, reference = classifier
    ids = [reference.ids(text) for text in TEXTS]
    expected = reference.embeddings(TEXTS)
    by_ids = np.array(post(f"{url}/embed", {"inputs": ids, "normalize": False}).json())
    np.testing.assert_allclose(by_ids, expected, rtol=1e-4, atol=1e-5)
    mixed = np.array(post(f"{url}/embed", {"inputs": [TEXTS[0], ids[1], TEXTS[2]]}).json())
    np.testing.assert_allclose(mixed, unit(expected), rtol=1e-4, atol=1e-5)
    single = post(f"{url}/embed", {"inputs": ids[1]}).json()
    np.testing.assert_allclose(single, unit(expected[1:2]), rtol=1e-4, atol=1e-5)
    assert (
        post(f"{url}/classify", {"inputs": ids}).json() == post(f"{url}/classify", {"inputs": TEXTS}).json()
    )
    assert (
        post(f"{url}/predict", {"inputs": ids[0]}).json()
        == post(f"{url}/predict", {"inputs": TEXTS[0]}).json()
    )


def test_openai_client_sends_token_arrays(classifier: tuple[str, Reference]) -> None:
    from openai import OpenAI

    url, reference = classifier
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    ids = [reference.ids(text) for text in TEXTS]
    result = client.embeddings.create(model="tiny", input=ids)
    vectors = np.array([item.embedding for item in sorted(result.data, key=lambda item: item.index)])
    np.testing.assert_allclose(vectors, unit(reference.embeddings(TEXTS)), rtol=1e-4, atol=1e-5)
    assert result.usage.prompt_tokens == sum(len(row) for row in ids)
    one = client.embeddings.create(model="tiny", input=ids[1])
    np.testing.assert_allclose(one.data[0].embedding, vectors[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("route", ["/embed", "/classify", "/predict", "/v1/embeddings", "/decode"])
def test_token_id_outside_the_vocabulary_is_422_naming_the_input(
    classifier: tuple[str, Reference], route: str
) -> None:
    url, reference = classifier
    vocab_size = reference.tokenizer.get_vocab_size(with_added_tokens=True)
    batch = [reference.ids("a cat"), [2, vocab_size, 3]]
    field = {"/v1/embeddings": "input", "/decode": "ids"}.get(route, "inputs")
    payload = {field: batch if route != "/predict" else [[2, 5, 3], [2, vocab_size, 3]]}
    assert_422(post(f"{url}{route}", payload), "input 1", str(vocab_size), "vocabulary")
    assert_422(post(f"{url}{route}", {field: [5, -1]}), "input 0", "negative")


def test_token_ids_share_the_text_limits(embedder: tuple[str, Reference]) -> None:
    url, reference = embedder
    ids = reference.ids("a cat")
    assert post(f"{url}/embed", {"inputs": [ids] * 4}).status_code == 200
    assert_422(post(f"{url}/embed", {"inputs": [ids] * 5}), "max_client_batch")
    assert_422(post(f"{url}/v1/embeddings", {"input": [ids] * 5}), "max_client_batch")
    long_ids = reference.ids(LONG_TEXT, side="right")[:1] * 40
    assert_422(post(f"{url}/embed", {"inputs": [long_ids], "truncate": False}), "input 0", "max_seq_len")
    response = post(f"{url}/embed", {"inputs": [long_ids]})
    assert response.status_code == 200 and response.headers["x-compute-tokens"] == "32"


def test_truncation_direction_is_honoured(classifier: tuple[str, Reference]) -> None:
    url, reference = classifier
    assert reference.ids(LONG_TEXT, "left") != reference.ids(LONG_TEXT, "right")
    for direction in ("Left", "Right", "left", "right"):
        side = direction.lower()
        payload = {"inputs": [LONG_TEXT], "normalize": False, "truncation_direction": direction}
        answer = np.array(post(f"{url}/embed", payload).json())
        np.testing.assert_allclose(answer, reference.embeddings([LONG_TEXT], side), rtol=1e-4, atol=1e-5)
    # Token IDs are cut on the same side: Left keeps the end.
    ids = list(range(5, 45))
    left = post(f"{url}/embed", {"inputs": [ids], "normalize": False, "truncation_direction": "Left"}).json()
    np.testing.assert_allclose(left, reference.embeddings([ids[-32:]]), rtol=1e-4, atol=1e-5)
    assert_422(
        post(f"{url}/embed", {"inputs": "a cat", "truncation_direction": "middle"}), "truncation_direction"
    )


def test_prompts_named_and_default(embedder: tuple[str, Reference]) -> None:
    url, reference = embedder
    texts = ["a cat", "the dog sees the garden."]

    def embed(payload: dict[str, Any]) -> np.ndarray:
        response = post(f"{url}/embed", {"inputs": texts, "normalize": False} | payload)
        assert response.status_code == 200, response.text
        return np.array(response.json())

    passage = reference.embeddings([f"passage: {text}" for text in texts])
    np.testing.assert_allclose(embed({"prompt_name": "passage"}), passage, rtol=1e-4, atol=1e-5)
    query = reference.embeddings([f"query: {text}" for text in texts])
    np.testing.assert_allclose(embed({}), query, rtol=1e-4, atol=1e-5)  # the default prompt
    np.testing.assert_allclose(embed({"prompt_name": None}), query, rtol=1e-4, atol=1e-5)
    # Token IDs are used as given: no prompt is added to them.
    ids = [reference.ids(text) for text in texts]
    np.testing.assert_allclose(embed({"inputs": ids}), reference.embeddings(texts), rtol=1e-4, atol=1e-5)
    openai = post(f"{url}/v1/embeddings", {"input": texts}).json()
    np.testing.assert_allclose(
        [row["embedding"] for row in openai["data"]], unit(query), rtol=1e-4, atol=1e-5
    )
    assert_422(
        post(f"{url}/embed", {"inputs": texts, "prompt_name": "nope"}), "prompt_name", "passage", "query"
    )
    info = httpx.get(f"{url}/info").json()
    assert (
        info["prompts"] == {"query": "query: ", "passage": "passage: "}
        and info["default_prompt_name"] == "query"
    )


def test_prompt_name_without_prompts_is_422(classifier: tuple[str, Reference]) -> None:
    url, _ = classifier
    assert_422(post(f"{url}/embed", {"inputs": "a cat", "prompt_name": "query"}), "prompt_name", "no prompts")
    assert_422(post(f"{url}/tokenize", {"inputs": "a cat", "prompt_name": "query"}), "prompt_name")


def test_embed_normalises_by_default_for_a_classifier_model(
    tiny_bundle: Path, tmp_path: Path, classifier: tuple[str, Reference]
) -> None:
    # A bundle whose manifest says normalize=false: /embed still normalises unless asked not to (TEI).
    import shutil

    from bundle.manifest import load_manifest

    _, reference = classifier
    bundle = tmp_path / "raw"
    shutil.copytree(tiny_bundle, bundle)
    manifest = load_manifest(bundle)
    embedding = manifest.embedding.model_copy(update={"normalize": False})
    manifest.model_copy(update={"embedding": embedding}).write(bundle)
    with running_service(bundle, variant="fp32") as url:
        rows = np.array(post(f"{url}/embed", {"inputs": TEXTS}).json())
        np.testing.assert_allclose(rows, unit(reference.embeddings(TEXTS)), rtol=1e-4, atol=1e-5)
        raw = np.array(post(f"{url}/embed", {"inputs": TEXTS, "normalize": False}).json())
        np.testing.assert_allclose(raw, reference.embeddings(TEXTS), rtol=1e-4, atol=1e-5)
        assert httpx.get(f"{url}/info").json()["normalize_default"] is True


def test_predict_in_teis_shape(classifier: tuple[str, Reference]) -> None:
    url, reference = classifier
    pair = ("a cat", "the dog sees the garden.")
    expected = softmax(reference.logits([TEXTS[0], pair]))

    def scores(predictions: list[dict[str, Any]]) -> list[float]:
        by_label = {prediction["label"]: prediction["score"] for prediction in predictions}
        return [by_label[label] for label in TINY_LABELS]

    single = post(f"{url}/predict", {"inputs": TEXTS[0]}).json()
    assert [prediction["score"] for prediction in single] == sorted(scores(single), reverse=True)
    np.testing.assert_allclose(scores(single), expected[0], rtol=1e-4, atol=1e-5)
    assert single == post(f"{url}/classify", {"inputs": TEXTS[0]}).json()[0]
    one_pair = post(f"{url}/predict", {"inputs": list(pair)}).json()
    np.testing.assert_allclose(scores(one_pair), expected[1], rtol=1e-4, atol=1e-5)
    batch = post(f"{url}/predict", {"inputs": [[TEXTS[0]], list(pair)]}).json()
    assert len(batch) == 2 and [[prediction["label"] for prediction in row] for row in batch] == [
        [prediction["label"] for prediction in row] for row in (single, one_pair)
    ]
    np.testing.assert_allclose([scores(row) for row in batch], expected, rtol=1e-4, atol=1e-5)
    raw = post(f"{url}/predict", {"inputs": TEXTS[0], "raw_scores": True}).json()
    np.testing.assert_allclose(max(scores(raw)), reference.logits([TEXTS[0]])[0].max(), rtol=1e-4, atol=1e-5)
    assert_422(post(f"{url}/predict", {"inputs": ["a", "b", "c"]}), "pair")
    assert_422(post(f"{url}/predict", {"inputs": [["a", "b", "c"]]}), "input 0", "pair")
    assert_422(
        post(f"{url}/predict", {"inputs": [LONG_TEXT], "truncate": False}), "a list of texts is a pair"
    )
    assert_422(post(f"{url}/predict", {"inputs": LONG_TEXT, "truncate": False}), "max_seq_len")


def test_similarity_is_the_cosine_of_the_embeddings(embedder: tuple[str, Reference]) -> None:
    url, reference = embedder
    body = {"inputs": {"source_sentence": TEXTS[0], "sentences": TEXTS[1:]}}
    similarities = post(f"{url}/similarity", body).json()
    vectors = unit(reference.embeddings([f"query: {text}" for text in TEXTS]))
    np.testing.assert_allclose(similarities, vectors[1:] @ vectors[0], rtol=1e-4, atol=1e-5)
    passage = post(f"{url}/similarity", body | {"parameters": {"prompt_name": "passage"}}).json()
    vectors = unit(reference.embeddings([f"passage: {text}" for text in TEXTS]))
    np.testing.assert_allclose(passage, vectors[1:] @ vectors[0], rtol=1e-4, atol=1e-5)
    too_many = {"inputs": {"source_sentence": "a cat", "sentences": ["a dog"] * 4}}
    assert_422(post(f"{url}/similarity", too_many), "max_client_batch")  # 5 texts with the source
    assert_422(post(f"{url}/similarity", {"inputs": {"source_sentence": "a cat", "sentences": []}}), "empty")


def test_tokenize_and_decode(embedder: tuple[str, Reference]) -> None:
    url, reference = embedder
    text = "the dög sees a cat"  # ö is two bytes in UTF-8: offsets are byte offsets, as TEI's
    tokens = post(f"{url}/tokenize", {"inputs": text, "prompt_name": "passage"}).json()
    prompted = "passage: " + text
    assert [token["id"] for token in tokens[0]] == reference.tokenizer.encode(prompted).ids
    first, last = tokens[0][0], tokens[0][-1]
    assert first["special"] and first["text"] == "[CLS]" and first["start"] is None
    assert last["special"] and last["text"] == "[SEP]"
    encoded = prompted.encode()
    for token in tokens[0][1:-1]:
        assert not token["special"]
        assert encoded[token["start"] : token["stop"]].decode() == token["text"]
    assert any(token["text"] == "dög" or "ö" in token["text"] for token in tokens[0])
    default = post(f"{url}/tokenize", {"inputs": [text, ""], "add_special_tokens": False}).json()
    assert [token["id"] for token in default[0]] == reference.tokenizer.encode(
        "query: " + text, add_special_tokens=False
    ).ids
    assert default[1] == reference_tokens_of_prompt_alone(reference)
    ids = [token["id"] for token in tokens[0]]
    assert post(f"{url}/decode", {"ids": ids}).json() == [reference.tokenizer.decode(ids)]
    assert post(f"{url}/decode", {"ids": [ids, ids[:3]], "skip_special_tokens": False}).json() == [
        reference.tokenizer.decode(ids, skip_special_tokens=False),
        reference.tokenizer.decode(ids[:3], skip_special_tokens=False),
    ]
    # What /tokenize returns, /embed takes back as input, for the same embedding.
    by_ids = post(f"{url}/embed", {"inputs": [ids]}).json()
    by_text = post(f"{url}/embed", {"inputs": [text], "prompt_name": "passage"}).json()
    np.testing.assert_allclose(by_ids, by_text, rtol=1e-5, atol=1e-6)
    assert_422(post(f"{url}/tokenize", {"inputs": []}), "empty")
    assert_422(post(f"{url}/decode", {"ids": []}), "empty")
    assert_422(post(f"{url}/tokenize", {"inputs": ["a"] * 5}), "max_client_batch")


def reference_tokens_of_prompt_alone(reference: Reference) -> list[dict[str, Any]]:
    """/tokenize's answer for "" with the default prompt and no special tokens: the prompt's tokens."""
    encoding = reference.tokenizer.encode("query: ", add_special_tokens=False)
    return [
        {"id": token_id, "text": "query: "[start:stop], "special": False, "start": start, "stop": stop}
        for token_id, (start, stop) in zip(encoding.ids, encoding.offsets, strict=True)
    ]


def test_root_answers_as_the_models_kind(
    classifier: tuple[str, Reference], embedder: tuple[str, Reference]
) -> None:
    classifier_url, _ = classifier
    assert (
        post(f"{classifier_url}/", {"inputs": "a cat"}).json()
        == post(f"{classifier_url}/predict", {"inputs": "a cat"}).json()
    )
    embedder_url, _ = embedder
    assert (
        post(f"{embedder_url}/", {"inputs": ["a cat"]}).json()
        == post(f"{embedder_url}/embed", {"inputs": ["a cat"]}).json()
    )
    assert_422(post(f"{embedder_url}/", {"inputs": ["a cat"], "dimensions": "8"}), "dimensions")
    malformed = httpx.post(
        f"{embedder_url}/", content=b'{"inputs": [', headers={"content-type": "application/json"}
    )
    assert_422(malformed, "malformed JSON", "line 1")
    assert_422(httpx.post(f"{embedder_url}/", content=b'{"inputs": "\xff"}'), "UTF-8")
    metrics = httpx.get(f"{embedder_url}/metrics").text
    assert 'encoder_requests_total{model="tiny",route="/",status="200"}' in metrics
    # Registered at start-up:
    assert 'encoder_requests_total{model="tiny",route="/similarity",status="200"}' in metrics


def test_huggingface_inference_client(
    classifier: tuple[str, Reference], embedder: tuple[str, Reference], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hugging Face's own client, given the service's URL. Were it to call the Hub, it would find a closed
    port on this machine instead of the network."""
    from huggingface_hub import InferenceClient, constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")

    embedder_url, embedder_reference = embedder
    vectors = InferenceClient(model=embedder_url).feature_extraction("a cat")
    np.testing.assert_allclose(
        np.asarray(vectors).reshape(-1),
        unit(embedder_reference.embeddings(["query: a cat"]))[0],
        rtol=1e-4,
        atol=1e-5,
    )
    classifier_url, classifier_reference = classifier
    # The client reads the first element of the answer: against TEI's flat list for one input (as
    # here), that is the best label.
    best = InferenceClient(model=classifier_url).text_classification("a cat")
    expected = softmax(classifier_reference.logits(["a cat"]))[0]
    assert best.label == TINY_LABELS[int(expected.argmax())]
    assert abs(best.score - expected.max()) < 1e-4
