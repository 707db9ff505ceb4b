"""Service pieces without a server process: settings and flags, the error table, the torch-free import,
and in-process (TestClient) checks of failures that a real bundle cannot produce on demand."""

import argparse
import asyncio
import gc
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from bundle import BundleError, load_manifest
from bundle.runtime import ModelOutputs
from service.app import create_app
from service.bundle_loader import choose_variant, load_model
from service.cli import SERVE_FLAGS, add_serve_arguments, settings_overrides
from service.direct_routes import takes_direct_path
from service.errors import ErrorType, reject_reason
from service.http_protocol import WholeResponseTransport
from service.middleware import OPEN_PATHS
from service.responses import render_json
from service.routes import service_state
from service.settings import CPU_BATCH_LIMITS, CUDA_BATCH_LIMITS, Settings, SettingsError, settings_from
from service.tokenization import NUMPY_BOUND_FROM

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_serving_never_imports_torch() -> None:
    probe = (
        "import sys, encoder_cli\n"
        "encoder_cli.build_parser()\n"  # what `encoder serve` imports before it runs
        "import service.server, service.app, service.batcher, bundle.runtime\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))\n"
    )
    finished = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr


def test_every_setting_is_a_flag() -> None:
    assert {flag.replace("-", "_") for flag, *_ in SERVE_FLAGS} == set(Settings.model_fields)


def test_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENCODER_MAX_BATCH_SIZE", "3")
    monkeypatch.setenv("ENCODER_API_KEY", "from-env")
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    settings = settings_from(settings_overrides(parser.parse_args(["--max-batch-size", "5"])))
    assert settings.max_batch_size == 5 and settings.api_key == "from-env"
    assert settings_from({}).max_batch_size == 3
    with pytest.raises(SettingsError, match="max_queue_items"):
        settings_from({"max_queue_items": 10, "max_client_batch": 20})


def test_batch_defaults_depend_on_the_provider() -> None:
    settings = Settings()
    cpus = len(os.sched_getaffinity(0))
    # On a CPU as many batches run at once as sessions of intra_op_threads fit in the CPUs.
    assert settings.batch_limits("cpu", 1) == CPU_BATCH_LIMITS.model_copy(update={"concurrent_batches": cpus})
    assert settings.batch_limits("cpu", cpus + 1).concurrent_batches == 1
    assert settings.batch_limits("cuda", 1) == CUDA_BATCH_LIMITS
    assert Settings(max_batch_size=1).batch_limits("cuda", 1).max_batch_size == 1
    assert Settings(concurrent_batches=3).batch_limits("cpu", 1).concurrent_batches == 3


def test_auto_variant_is_the_manifests_preferred_one(tiny_bundle: Path) -> None:
    manifest = load_manifest(tiny_bundle)
    assert manifest.preferred == {"cpu": "int8", "cuda": "fp32"}
    assert choose_variant(manifest, "auto", on_cuda=False) == "int8"
    assert choose_variant(manifest, "auto", on_cuda=True) == "fp32"
    assert choose_variant(manifest, "fp32", on_cuda=False) == "fp32"
    fp32_preferred = manifest.model_copy(update={"preferred": {"cpu": "fp32"}})
    assert choose_variant(fp32_preferred, "auto", on_cuda=False) == "fp32"
    # A bundle written before the manifest named a preference: int8 on CPU, fp16 (absent here) on CUDA.
    older = manifest.model_copy(update={"preferred": {}})
    assert choose_variant(older, "auto", on_cuda=False) == "int8"
    assert choose_variant(older, "auto", on_cuda=True) == "fp32"
    with pytest.raises(BundleError, match="variant fp16 requested but the bundle has only"):
        choose_variant(manifest, "fp16", on_cuda=True)


def test_error_table_matches_the_design() -> None:
    expected = {
        "Validation": 422,
        "PayloadTooLarge": 413,
        "Overloaded": 429,
        "Unauthorized": 401,
        "Timeout": 504,
        "Unhealthy": 503,
        "Backend": 500,
        "RequestTimeout": 408,
        "MalformedHttp": 400,
    }
    assert {error.tei_name: error.status for error in ErrorType if error.tei_name in expected} == expected


def test_each_status_has_one_row_and_one_reject_reason() -> None:
    statuses = [error.status for error in ErrorType]
    assert len(statuses) == len(set(statuses))  # the middleware counts rejections by status
    assert reject_reason(429) == "queue_full" and reject_reason(499) == "client_disconnected"
    assert reject_reason(200) is None and reject_reason(404) is None
    assert ErrorType.for_status(405) is ErrorType.METHOD_NOT_ALLOWED and ErrorType.for_status(418) is None


def readme_row(starting_with: str) -> str:
    rows = (REPO_ROOT / "README.md").read_text().splitlines()
    return next(row for row in rows if row.startswith(starting_with))


def test_readme_names_the_real_rejection_reasons_and_open_paths() -> None:
    reasons = {error_type.reject_reason for error_type in ErrorType if error_type.reject_reason}
    reasons_row = readme_row("| `encoder_rejected_total{reason}`")
    assert set(re.findall(r"`([a-z_]+)`", reasons_row)) == reasons
    api_key_row = readme_row("| `ENCODER_API_KEY`")
    assert set(re.findall(r"`(/[^`]*)`", api_key_row)) == OPEN_PATHS


def test_backend_failure_is_a_500_and_the_next_request_is_served(
    tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = load_model(Settings(bundle=tiny_bundle), tiny_bundle, intra_op_threads=1)
    real_run = model.runtime.run
    calls = {"count": 0}

    def fails_once(input_ids: np.ndarray, attention_mask: np.ndarray) -> ModelOutputs:
        calls["count"] += 1
        if calls["count"] == 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_run(input_ids, attention_mask)

    monkeypatch.setattr(model.runtime, "run", fails_once)
    with TestClient(create_app(Settings(bundle=tiny_bundle), {"tiny": model})) as client:
        failed = client.post("/embed", json={"inputs": "a cat"})
        assert failed.status_code == 500
        assert failed.json()["error_type"] == "Backend"
        openai_failed = client.post("/v1/embeddings", json={"input": "a cat"})
        assert openai_failed.status_code == 200  # the loop survived the failed batch
        assert client.get("/ready").status_code == 200
        assert 'encoder_rejected_total{model="tiny",reason="backend"} 1.0' in client.get("/metrics").text


def test_bundle_without_classifier_serves_embed_only(tiny_bundle_no_classifier: Path) -> None:
    with TestClient(create_app(Settings(bundle=tiny_bundle_no_classifier))) as client:
        assert client.post("/embed", json={"inputs": ["a cat", "the dog"]}).status_code == 200
        refused = client.post("/classify", json={"inputs": "a cat"})
        assert refused.status_code == 422 and refused.json()["error_type"] == "Validation"
        assert client.get("/info").json()["labels"] == []


class RecordingTokenizer:
    """Passes every call on to the real tokenizer, and records the length of each text it was given."""

    def __init__(self, tokenizer: object) -> None:
        self.tokenizer = tokenizer
        self.lengths: list[int] = []

    def encode_batch(self, texts: list[str]) -> list[object]:
        self.lengths += [len(text) for text in texts]
        return self.tokenizer.encode_batch(texts)  # type: ignore[attr-defined]


def test_the_tokenizer_sees_at_most_max_chars_and_the_used_tokens_do_not_change(tiny_bundle: Path) -> None:
    from tokenizers import Tokenizer

    from service.tokenization import TextTokenizer

    max_seq_len = 32
    tokenizer = TextTokenizer(tiny_bundle / "tokenizer.json", max_seq_len)
    recording = RecordingTokenizer(tokenizer._cut["right", "longest_first"])
    tokenizer._cut["right", "longest_first"] = recording  # type: ignore[assignment]
    uncut = Tokenizer.from_file(str(tiny_bundle / "tokenizer.json"))
    uncut.no_padding()
    uncut.enable_truncation(max_seq_len)
    words = "the dog sees the garden and a cat holds a wooden box near the river bank "
    texts = [words * 5000, "a cat", words * 2]  # 370,000 characters, then two that need no cut
    encoded = tokenizer.encode(texts)
    assert recording.lengths == [tokenizer.max_chars, 5, len(texts[2])] and tokenizer.max_chars < 10_000
    assert encoded.token_ids == [encoding.ids for encoding in uncut.encode_batch(texts)]
    assert encoded.truncated == [True, False, True]
    # The admission estimate before tokenising: no more than max_seq_len, nor one per character + 2.
    assert tokenizer.token_bound(texts) == max_seq_len + len("a cat") + 2 + max_seq_len
    # From NUMPY_BOUND_FROM texts the bound is summed in numpy: the same sum.
    many = [words * (index % 3) + "a cat" for index in range(NUMPY_BOUND_FROM + 8)]
    assert tokenizer.token_bound(many) == sum(min(max_seq_len, len(text) + 2) for text in many)
    # A pair has three special tokens; token IDs are as many as they are.
    assert tokenizer.token_bound([("a", "bc"), [5, 6, 7]]) == (1 + 2 + 3) + 3
    # Cutting on the left keeps the end of the text, characters first and then tokens.
    uncut.enable_truncation(max_seq_len, direction="left")
    assert tokenizer.encode([texts[0]], "left").token_ids == [uncut.encode(texts[0]).ids]


class RecordingTransport:
    """What a socket would have been asked to send, one entry per write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


def response_writes(
    method: str, messages: list[dict[str, Any]], expect_100_continue: bool = False
) -> RecordingTransport:
    """Drive uvicorn's own request/response cycle through the service's transport and record the writes."""
    transport = RecordingTransport()
    scope = {"type": "http", "method": method, "path": "/embed", "http_version": "1.1"}
    cycle = RequestResponseCycle(
        scope=scope,  # type: ignore[arg-type]
        transport=transport,  # type: ignore[arg-type]
        flow=FlowControl(transport),  # type: ignore[arg-type]
        logger=logging.getLogger("test"),
        access_logger=logging.getLogger("test"),
        access_log=False,
        default_headers=[],
        message_event=asyncio.Event(),
        expect_100_continue=expect_100_continue,
        keep_alive=True,
        on_response=lambda: None,
    )
    cycle.transport = WholeResponseTransport(transport, cycle)  # type: ignore[arg-type,assignment]

    async def drive() -> None:
        if expect_100_continue:
            cycle.message_event.set()  # the body has arrived, so receive() answers 100 Continue and returns
            await cycle.receive()
        for message in messages:
            if message["type"] == "close":
                cycle.transport.close()
            else:
                await cycle.send(message)  # type: ignore[arg-type]

    asyncio.run(drive())
    return transport


START = {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}


def test_a_response_head_leaves_with_its_body_in_one_write() -> None:
    sent = response_writes("POST", [START, {"type": "http.response.body", "body": b"{}"}])
    assert len(sent.writes) == 1
    assert sent.writes[0].startswith(b"HTTP/1.1 200 OK\r\n") and sent.writes[0].endswith(b"\r\n\r\n{}")


def test_a_head_request_and_100_continue_are_not_held() -> None:
    head_only = response_writes("HEAD", [START])
    assert len(head_only.writes) == 1 and head_only.writes[0].startswith(b"HTTP/1.1 200 OK")
    continued = response_writes("POST", [START, {"type": "http.response.body", "body": b"{}"}], True)
    assert continued.writes[0] == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert len(continued.writes) == 2 and continued.writes[1].endswith(b"{}")


def test_a_response_closed_before_its_body_sends_nothing() -> None:
    """A proxy can retry a response that never began, not one whose head it has already passed on."""
    sent = response_writes("POST", [START, {"type": "close"}])
    assert sent.writes == [] and sent.closed


@pytest.mark.parametrize(
    "content",
    [
        np.arange(100 * 3, dtype=np.float32).reshape(100, 3) / 7,  # a long matrix: rendered in slices
        {
            "object": "list",
            "data": [{"index": i, "embedding": np.full(2, i / 3, np.float32)} for i in range(70)],
        },
        [[{"label": "a", "score": 0.5}]] * 33,
        np.linspace(0, 1, 65, dtype=np.float32),
        {"short": [1, 2], "empty": [], "nested": {"deep": list(range(40))}},
        [],
    ],
)
def test_sliced_rendering_is_the_same_json_as_one_orjson_call(content: object) -> None:
    expected = orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
    assert asyncio.run(render_json(content)) == expected


@pytest.mark.parametrize(
    ("method", "path", "content_type", "direct"),
    [
        ("POST", "/embed", b"application/json", True),
        ("POST", "/classify", b"application/json; charset=utf-8", True),
        ("POST", "/v1/embeddings", b"application/vnd.api+json", True),
        ("POST", "/embed", b"Application/JSON", True),
        ("POST", "/embed", b"text/plain", False),  # FastAPI reads it as bytes and answers its 422
        ("POST", "/embed", None, False),
        ("GET", "/embed", b"application/json", False),  # FastAPI answers 405
        ("POST", "/rerank", b"application/json", True),
        ("POST", "/v2/rerank", b"application/json", True),
        ("POST", "/", b"application/json", False),  # the route depends on the model's kind
        ("POST", "/tokenize", b"application/json", False),
    ],
)
def test_only_json_posts_to_the_direct_routes_take_the_direct_path(
    method: str, path: str, content_type: bytes | None, direct: bool
) -> None:
    headers = {} if content_type is None else {b"content-type": content_type}
    assert takes_direct_path({"method": method, "path": path}, headers) is direct


def test_json_posts_to_embed_are_answered_without_fastapis_route(tiny_bundle: Path) -> None:
    """With FastAPI's route for /embed made to fail (its `State` dependency overridden), a JSON POST is
    still answered, in full, errors included (the direct path); a GET still reaches FastAPI's route."""

    def no_state() -> None:
        raise RuntimeError("FastAPI's route was used")

    app = create_app(Settings(bundle=tiny_bundle))
    app.dependency_overrides[service_state] = no_state
    with TestClient(app, raise_server_exceptions=False) as client:
        answered = client.post("/embed", json={"inputs": ["a cat", "the dog"]})
        assert answered.status_code == 200 and len(answered.json()) == 2
        assert answered.headers["x-model-name"] == "tiny"
        refused = client.post("/embed", json={"inputs": 5})
        assert refused.status_code == 422 and refused.json()["error_type"] == "Validation"
        assert client.post("/v1/embeddings", json={"input": "a cat"}).json()["data"][0]["index"] == 0
        assert client.get("/info").status_code == 500  # the override is in force on FastAPI's routes


def test_the_direct_path_refuses_on_the_input_count_before_validating(tiny_bundle: Path) -> None:
    """A request of texts the queue has no room for is refused (429) once they are measured, before its
    body is validated: under a flood of big requests, validation cost more than the JSON parse."""
    app = create_app(Settings(bundle=tiny_bundle))
    measured: list[int] = []

    def room_for_three(model: str | None, named_in_body: bool, texts: list[str]) -> str | None:
        measured.append(len(texts))
        return "tiny" if len(texts) > 3 else None

    with TestClient(app) as client:
        app.state.service.refusing_model = room_for_three
        refused = client.post("/embed", json={"inputs": ["a cat"] * 4, "normalize": "yes"})
        assert refused.status_code == 429 and refused.json()["error_type"] == "Overloaded"
        assert refused.headers["retry-after"].isdigit()
        assert client.post("/embed", json={"inputs": ["a cat"] * 3}).status_code == 200
        ids = client.post("/embed", json={"inputs": [[5, 6]] * 5})  # token IDs: left to admission
        assert ids.status_code == 200 and len(ids.json()) == 5
        openai = client.post("/v1/embeddings", json={"input": ["a cat"] * 4, "model": "tiny"})
        assert openai.status_code == 429 and openai.json()["error"]["type"] == "rate_limit_error"
        assert client.post("/classify", json={"inputs": ["a cat"] * 9}).status_code == 429
        metrics = client.get("/metrics").text
    assert measured == [4, 3, 0, 4, 9]
    assert 'encoder_rejected_total{model="tiny",reason="queue_full"} 3.0' in metrics


def test_the_early_refusal_measures_texts_as_admission_does(tiny_bundle: Path) -> None:
    """With the real queue: room held by an admitted request leaves space for three more inputs and 40
    tokens; a request is refused (429, before validation) exactly when admission would refuse it (a text
    counts at most max_seq_len, 32 here, or its characters + 2)."""
    settings = Settings(bundle=tiny_bundle, max_client_batch=8, max_queue_items=100, max_queue_tokens=1000)
    app = create_app(settings)
    with TestClient(app) as client:
        batcher = app.state.service.registry.get(None).batcher
        with batcher.admit(items=97, tokens=960):  # a request being tokenised
            four = client.post("/embed", json={"inputs": ["a cat"] * 4, "normalize": "yes"})
            assert four.status_code == 429 and four.json()["error_type"] == "Overloaded"
            long = client.post("/embed", json={"inputs": ["x" * 30] * 2, "normalize": "yes"})  # 64 tokens
            assert long.status_code == 429
            assert client.post("/embed", json={"inputs": ["a cat"] * 3}).status_code == 200  # 21 tokens
            assert client.post("/embed", json={"inputs": ["x" * 17] * 2}).status_code == 200  # 38 tokens
        assert client.post("/embed", json={"inputs": ["a cat"] * 4}).status_code == 200


def test_the_start_up_heap_is_frozen_for_the_collector(tiny_bundle: Path) -> None:
    gc.unfreeze()  # what earlier apps of this test session froze
    with TestClient(create_app(Settings(bundle=tiny_bundle))):
        assert gc.get_freeze_count() > 0
