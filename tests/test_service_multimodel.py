"""Several models behind one endpoint, and new versions rolled out while serving (issue 13): real
uvicorn processes on two real bundles built by the project's own export, the official `openai` and
`huggingface_hub` clients, and every answer checked against raw ONNX Runtime for the version that
served it."""

import argparse
import concurrent.futures
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from tokenizers import Tokenizer

from service.cli import add_serve_arguments, settings_overrides
from service.process import ServiceProcess, running_service
from service.settings import BundleSpec, SettingsError, parse_bundles, settings_from

pytestmark = pytest.mark.e2e

API_KEY = "operator-secret"
# The bundles go in as ENCODER_BUNDLE: `bundle` is the service helpers' own first argument.
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def tiny_bundle_v2(tiny_bundle_no_classifier: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second version of tiny_bundle_no_classifier that answers differently: manifest version 2 with
    a default prompt, which goes before every text (the manifest is not checksummed; `encoder export
    --version 2 --prompt ... --default-prompt-name ...` writes the same fields)."""
    from bundle.manifest import EmbeddingSpec, load_manifest

    out = tmp_path_factory.mktemp("v2") / "tiny_v2"
    shutil.copytree(tiny_bundle_no_classifier, out)
    manifest = load_manifest(out)
    prompts = {"embedding": EmbeddingSpec(**manifest.embedding.model_dump() | V2_PROMPT)}
    manifest.model_copy(update={"version": "2"} | prompts).write(out)
    return out


V2_PROMPT = {"prompts": {"query": "query: "}, "default_prompt_name": "query"}


TEXTS = ["the dog sees the garden.", "a cat", "an old oak grows near the river bank and covers a wooden box."]


def embeddings_of(bundle: Path, texts: list[str]) -> np.ndarray:
    """Raw ONNX Runtime on the bundle's fp32 graph, one text at a time (after the default prompt, if
    the bundle has one), L2-normalised."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    prompt = manifest["embedding"]["prompts"].get(manifest["embedding"]["default_prompt_name"], "")
    tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(manifest["max_seq_len"])
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    rows = []
    for text in texts:
        ids = np.array([tokenizer.encode(prompt + text).ids], dtype=np.int64)
        (embedding,) = session.run(["embedding"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        rows.append(embedding[0] / np.linalg.norm(embedding[0]))
    return np.array(rows)


def until(condition: Callable[[], bool], timeout_s: float = 180.0) -> None:
    """Poll `condition` until it holds; the timeout is generous (the suite shares a loaded machine)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_bundle_setting_takes_names_and_the_flag_repeats() -> None:
    assert parse_bundles("bundles/default") == [BundleSpec(name=None, directory=Path("bundles/default"))]
    assert [spec.name for spec in parse_bundles("search=/b/s,topics=/b/t")] == ["search", "topics"]
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    flags = parser.parse_args(["--bundle", "search=/b/s", "--bundle", "topics=/b/t"])
    assert settings_from(settings_overrides(flags)).bundle == "search=/b/s,topics=/b/t"
    for bad, reason in (
        ("/b/s,/b/t", "each needs a name"),
        ("a=/b/s,a=/b/t", "twice"),
        ("a/b=/b/s", "model name"),
        ("a=", "no directory"),
        ("a=/b/s,", "empty entry"),
    ):
        with pytest.raises(SettingsError, match=reason):
            settings_from({"bundle": bad})


@pytest.fixture(scope="module")
def two_models(tiny_bundle: Path, tiny_bundle_v2: Path) -> Iterator[str]:
    # fp32 so that answers can be compared exactly with raw ONNX Runtime.
    bundles = f"classes={tiny_bundle},search={tiny_bundle_v2}"
    with running_service(tiny_bundle, ENCODER_BUNDLE=bundles, variant="fp32") as url:
        yield url


def test_both_models_answer_through_each_route(
    two_models: str, tiny_bundle: Path, tiny_bundle_v2: Path
) -> None:
    from openai import NotFoundError, OpenAI

    client = OpenAI(base_url=f"{two_models}/v1", api_key="unused")
    assert [model.id for model in client.models.list()] == ["classes", "search"]
    assert client.models.retrieve("search").id == "search"
    for name, bundle, version in (("classes", tiny_bundle, "1"), ("search", tiny_bundle_v2, "2")):
        result = client.embeddings.create(model=name, input=TEXTS)
        vectors = np.array([item.embedding for item in result.data], dtype=np.float32)
        np.testing.assert_allclose(vectors, embeddings_of(bundle, TEXTS), rtol=1e-4, atol=1e-5)
        assert result.model == f"{name}@{version}"
        tei = httpx.post(f"{two_models}/models/{name}/embed", json={"inputs": TEXTS})
        assert tei.headers["x-model-name"] == name and tei.headers["x-model-version"] == version
        np.testing.assert_allclose(np.array(tei.json()), embeddings_of(bundle, TEXTS), rtol=1e-4, atol=1e-5)
    # The two bundles differ, so each answer above came from its own model; no `model`: the default.
    default = httpx.post(f"{two_models}/v1/embeddings", json={"input": TEXTS[0]}).json()
    assert default["model"] == "classes@1"
    assert httpx.post(f"{two_models}/embed", json={"inputs": "a cat"}).headers["x-model-name"] == "classes"
    # Each model's own kind of answer: the classifier classifies, the embedder has no classifier.
    assert httpx.post(f"{two_models}/models/classes/classify", json={"inputs": "a cat"}).status_code == 200
    refused = httpx.post(f"{two_models}/models/search/classify", json={"inputs": "a cat"})
    assert refused.status_code == 422 and "no classifier" in refused.json()["error"]
    assert httpx.post(f"{two_models}/models/search/tokenize", json={"inputs": "a cat"}).status_code == 200
    # Unknown models: OpenAI's model_not_found on /v1, TEI's shape elsewhere; never another model.
    with pytest.raises(NotFoundError) as missing:
        client.embeddings.create(model="text-embedding-3-small", input="a cat")
    assert missing.value.body["code"] == "model_not_found" and missing.value.body["param"] == "model"
    assert httpx.get(f"{two_models}/v1/models/nope").json()["error"]["code"] == "model_not_found"
    unknown = httpx.post(f"{two_models}/models/nope/embed", json={"inputs": "a cat"})
    assert unknown.status_code == 404 and unknown.json()["error_type"] == "NotFound"
    info = httpx.get(f"{two_models}/info").json()
    assert info["served_model_name"] == "classes"
    assert [(model["served_model_name"], model["model_version"]) for model in info["models"]] == [
        ("classes", "1"),
        ("search", "2"),
    ]
    assert all(model["resident_bytes"] > 0 for model in info["models"])
    assert httpx.get(f"{two_models}/models/search/info").json()["labels"] == []
    # Without an API key configured, the admin route is not served.
    assert httpx.post(f"{two_models}/admin/reload").status_code == 404
    metrics = httpx.get(f"{two_models}/metrics").text
    assert 'encoder_requests_total{model="search",route="/embed",status="200"} 1.0' in metrics
    assert 'encoder_requests_total{model="search",route="/v1/embeddings",status="200"} 1.0' in metrics
    assert (
        'encoder_model_info{model="search",name="tiny",provider="cpu",variant="fp32",version="2"} 1.0'
        in metrics
    )
    assert 'encoder_batch_size_count{model="search"}' in metrics
    assert 'model="nope"' not in metrics and 'model="text-embedding-3-small"' not in metrics


def test_tei_client_given_a_model_base_url(
    two_models: str, tiny_bundle_v2: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import InferenceClient, constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # never the Hub
    vectors = InferenceClient(model=f"{two_models}/models/search").feature_extraction("a cat")
    expected = embeddings_of(tiny_bundle_v2, ["a cat"])[0]
    np.testing.assert_allclose(np.asarray(vectors).reshape(-1), expected, rtol=1e-4, atol=1e-5)
    best = InferenceClient(model=f"{two_models}/models/classes").text_classification("a cat")
    assert best.label in ("animal", "plant", "tool")


def test_a_flooded_model_does_not_refuse_the_other(tiny_bundle: Path, tiny_bundle_v2: Path) -> None:
    """Each model has its own queue: one full of work (429s) leaves the other's requests served.
    (How much slower the other gets is measured, not asserted: BENCHMARKS.md.)"""
    bundles = f"busy={tiny_bundle},calm={tiny_bundle_v2}"
    limits = {"max_queue_items": 32, "max_client_batch": 32, "max_batch_size": 1}
    with running_service(tiny_bundle, ENCODER_BUNDLE=bundles, **limits) as url:
        flood = {"inputs": [TEXTS[2]] * 32}
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            floods = [
                pool.submit(httpx.post, f"{url}/models/busy/embed", json=flood, timeout=60) for _ in range(48)
            ]
            calm = [
                httpx.post(f"{url}/models/calm/embed", json={"inputs": "a cat"}, timeout=60)
                for _ in range(20)
            ]
            statuses = [future.result().status_code for future in floods]
        assert 429 in statuses and set(statuses) <= {200, 429}
        assert {response.status_code for response in calm} == {200}
        metrics = httpx.get(f"{url}/metrics").text
        assert (
            f'encoder_rejected_total{{model="busy",reason="queue_full"}} {statuses.count(429)}.0' in metrics
        )
        assert 'encoder_rejected_total{model="calm",reason="queue_full"} 0.0' in metrics


@dataclass
class Served:
    status: int
    version: str | None
    text: str
    vector: np.ndarray | None


class LoadLoop:
    """Clients that keep sending /v1/embeddings requests on `workers` threads until told to stop (or a
    bound is reached), recording every answer."""

    def __init__(self, url: str, workers: int, bound: int) -> None:
        self.url, self.bound = url, bound
        self.answers: list[Served] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.pool = concurrent.futures.ThreadPoolExecutor(workers)
        self.futures = [self.pool.submit(self._work, worker) for worker in range(workers)]

    def _work(self, worker: int) -> None:
        with httpx.Client(timeout=60, headers=AUTH) as client:
            sent = 0
            while not self.stop.is_set():
                text = TEXTS[(worker + sent) % len(TEXTS)]
                sent += 1
                try:
                    response = client.post(
                        f"{self.url}/v1/embeddings", json={"input": text, "model": "search"}
                    )
                except httpx.TransportError:
                    self._record(Served(0, None, text, None))  # a dropped connection counts as lost
                    continue
                vector = None
                if response.status_code == 200:
                    vector = np.array(response.json()["data"][0]["embedding"], dtype=np.float32)
                self._record(
                    Served(response.status_code, response.headers.get("x-model-version"), text, vector)
                )

    def _record(self, answer: Served) -> None:
        with self.lock:
            self.answers.append(answer)
            if len(self.answers) >= self.bound:
                self.stop.set()

    def count(self, version: str | None = None) -> int:
        with self.lock:
            return sum(1 for answer in self.answers if version is None or answer.version == version)

    def finish(self) -> list[Served]:
        self.stop.set()
        for future in self.futures:
            future.result()
        self.pool.shutdown()
        return self.answers


def point(link: Path, target: Path) -> None:
    """Repoint the symlink `link` at `target` atomically (a rename), as an operator would roll out."""
    staged = link.with_name(link.name + ".new")
    staged.unlink(missing_ok=True)
    staged.symlink_to(target)
    os.replace(staged, link)


def check_answers(answers: list[Served], expected: dict[str, dict[str, np.ndarray]]) -> None:
    """Every request served (no error, no lost connection), each by a known version, with that
    version's own raw ONNX Runtime result."""
    assert [answer.status for answer in answers if answer.status != 200] == []
    for answer in answers:
        assert answer.version in expected and answer.vector is not None
        np.testing.assert_allclose(answer.vector, expected[answer.version][answer.text], rtol=1e-4, atol=1e-5)


def expected_vectors(bundle: Path) -> dict[str, np.ndarray]:
    return dict(zip(TEXTS, embeddings_of(bundle, TEXTS), strict=True))


def test_swap_under_load_loses_no_request(
    tiny_bundle_no_classifier: Path, tiny_bundle_v2: Path, tmp_path: Path
) -> None:
    link = tmp_path / "search"
    point(link, tiny_bundle_no_classifier)
    expected = {"1": expected_vectors(tiny_bundle_no_classifier), "2": expected_vectors(tiny_bundle_v2)}
    with running_service(link, ENCODER_BUNDLE=f"search={link}", variant="fp32", api_key=API_KEY) as url:
        loop = LoadLoop(url, workers=4, bound=6000)
        try:
            until(lambda: loop.count("1") >= 300)
            point(link, tiny_bundle_v2)
            assert httpx.post(f"{url}/admin/reload").status_code == 401  # operators only
            reloaded = httpx.post(f"{url}/admin/reload", headers=AUTH, timeout=120).json()
            assert reloaded["models"] == [
                {
                    "model": "search",
                    "outcome": "reloaded",
                    "version": "2",
                    "previous_version": "1",
                    "error": None,
                }
            ]
            # Synchronised on answers, not on time: some served by the new version after the swap.
            until(lambda: loop.count("2") >= 300 or loop.stop.is_set())
        finally:
            answers = loop.finish()
        assert loop.count("2") >= 300, "the bound was reached before the new version served"
        check_answers(answers, expected)
        assert answers[-1].version == "2"
        # A reload that finds the same manifest changes nothing.
        again = httpx.post(f"{url}/admin/reload", headers=AUTH, timeout=120).json()
        assert again["models"][0]["outcome"] == "unchanged"
        metrics = httpx.get(f"{url}/metrics").text
        assert 'encoder_model_reloads_total{model="search",outcome="reloaded"} 1.0' in metrics
        assert 'encoder_model_reloads_total{model="search",outcome="unchanged"} 1.0' in metrics
        # The old version was released: only the new one is listed as loaded.
        until(
            lambda: (
                loaded_versions(url)
                == ['{model="search",name="tiny",provider="cpu",variant="fp32",version="2"}']
            )
        )


def loaded_versions(url: str) -> list[str]:
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    return [
        line.split()[0].removeprefix("encoder_model_info")
        for line in lines
        if line.startswith("encoder_model_info{")
    ]


def test_sighup_refuses_a_corrupt_version_and_swaps_in_a_good_one(
    tiny_bundle_no_classifier: Path, tiny_bundle_v2: Path, tmp_path: Path
) -> None:
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_bundle_v2, corrupt)
    graph = corrupt / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:-16] + bytes(16))  # the manifest's sha256 no longer matches
    link = tmp_path / "search"
    point(link, tiny_bundle_no_classifier)
    v1 = expected_vectors(tiny_bundle_no_classifier)

    def reloads(service: ServiceProcess, outcome: str) -> float:
        series = f'encoder_model_reloads_total{{model="search",outcome="{outcome}"}} '
        return float(httpx.get(f"{service.base_url}/metrics").text.split(series)[1].split()[0])

    with ServiceProcess(link, ENCODER_BUNDLE=f"search={link}", variant="fp32") as service:
        point(link, corrupt)
        service.process.send_signal(signal.SIGHUP)
        until(lambda: reloads(service, "refused") == 1)
        refusals = [line for line in service.log().splitlines() if "reload of search refused" in line]
        assert len(refusals) == 1 and "model.onnx: sha256 mismatch" in refusals[0]
        answer = httpx.post(f"{service.base_url}/embed", json={"inputs": TEXTS[0]})
        assert answer.headers["x-model-version"] == "1"  # the old version keeps serving
        np.testing.assert_allclose(answer.json()[0], v1[TEXTS[0]], rtol=1e-4, atol=1e-5)
        point(link, tiny_bundle_v2)
        service.process.send_signal(signal.SIGHUP)
        until(lambda: reloads(service, "reloaded") == 1)
        answer = httpx.post(f"{service.base_url}/embed", json={"inputs": TEXTS[0]})
        assert answer.headers["x-model-version"] == "2"
        np.testing.assert_allclose(
            answer.json()[0], expected_vectors(tiny_bundle_v2)[TEXTS[0]], rtol=1e-4, atol=1e-5
        )
        assert service.process.poll() is None


def test_a_model_past_the_memory_budget_is_refused_at_start(tiny_bundle: Path) -> None:
    service = ServiceProcess(tiny_bundle, memory_budget_mb=1)
    with pytest.raises(RuntimeError, match="exited with 2"):
        service.wait_ready()
    assert "over memory_budget_mb (1)" in service.log()
    service.stop()
