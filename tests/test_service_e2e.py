"""The real service on the project's own tiny bundle: a uvicorn process on 127.0.0.1 driven by httpx and
the official `openai` client; every row of the error table; overload; SIGTERM drain."""

import asyncio
import base64
import concurrent.futures
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from tokenizers import Tokenizer

from service.process import ServiceProcess, free_port, running_service

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parent.parent

TEXTS = ["the dog sees the garden.", "a cat", "an old oak grows near the river bank and covers a wooden box."]
LONG_TEXT = " ".join(["the hammer breaks a nail"] * 40)  # well over max_seq_len (32) tokens


def reference(bundle: Path, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Raw ONNX Runtime on the fp32 graph, one text at a time (no padding, no batching)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(manifest["max_seq_len"])
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    embeddings, logits = [], []
    for text in texts:
        ids = np.array([tokenizer.encode(text).ids], dtype=np.int64)
        embedding, logit = session.run(
            ["embedding", "logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        )
        embeddings.append(embedding[0])
        logits.append(logit[0])
    return np.array(embeddings), np.array(logits)


def unit(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def base_url(tiny_bundle: Path) -> Iterator[str]:
    # fp32 so that answers can be compared exactly with raw ONNX Runtime (int8 quantises activations
    # per batch, so its output depends slightly on the batch companions).
    with running_service(tiny_bundle, variant="fp32") as url:
        yield url


@pytest.fixture(scope="module")
def limited_url(tiny_bundle: Path) -> Iterator[str]:
    with running_service(tiny_bundle, max_client_batch=8, max_queue_items=8, max_payload_bytes=4096) as url:
        yield url


def post(url: str, payload: object, **kwargs: object) -> httpx.Response:
    return httpx.post(url, json=payload, timeout=30, **kwargs)  # type: ignore[arg-type]


def assert_error(response: httpx.Response, status: int, error_type: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    if response.request.url.path.startswith("/v1/"):
        assert body["error"]["code"] == error_type and body["error"]["message"]
    else:
        assert body["error_type"] == error_type and body["error"]


def test_embed_matches_raw_onnx_runtime_in_input_order(base_url: str, tiny_bundle: Path) -> None:
    expected, _ = reference(tiny_bundle, TEXTS)
    response = post(f"{base_url}/embed", {"inputs": TEXTS, "normalize": False})
    assert response.status_code == 200
    np.testing.assert_allclose(np.array(response.json()), expected, rtol=1e-4, atol=1e-5)
    normalized = np.array(post(f"{base_url}/embed", {"inputs": TEXTS}).json())
    np.testing.assert_allclose(normalized, unit(expected), rtol=1e-4, atol=1e-5)
    single = post(f"{base_url}/embed", {"inputs": TEXTS[1]}).json()
    np.testing.assert_allclose(single, unit(expected)[1:2], rtol=1e-4, atol=1e-5)
    for header in ("x-total-time", "x-tokenization-time", "x-queue-time", "x-inference-time"):
        assert response.headers[header].isdigit()
    assert int(response.headers["x-compute-tokens"]) > len(TEXTS)


def test_dimensions_truncate_before_normalising(base_url: str, tiny_bundle: Path) -> None:
    expected, _ = reference(tiny_bundle, TEXTS)
    rows = np.array(post(f"{base_url}/embed", {"inputs": TEXTS, "dimensions": 8}).json())
    assert rows.shape == (3, 8)
    np.testing.assert_allclose(rows, unit(expected[:, :8]), rtol=1e-4, atol=1e-5)


def test_long_input_is_truncated_by_default(base_url: str) -> None:
    response = post(f"{base_url}/embed", {"inputs": [LONG_TEXT]})
    assert response.status_code == 200
    assert int(response.headers["x-compute-tokens"]) == 32


def test_classify_scores_and_raw_logits(base_url: str, tiny_bundle: Path) -> None:
    _, logits = reference(tiny_bundle, TEXTS)
    predictions = post(f"{base_url}/classify", {"inputs": TEXTS}).json()
    assert len(predictions) == 3
    for row, prediction in zip(logits, predictions, strict=True):
        scores = [entry["score"] for entry in prediction]
        assert sorted({entry["label"] for entry in prediction}) == ["animal", "plant", "tool"]
        assert scores == sorted(scores, reverse=True)
        assert abs(sum(scores) - 1) < 1e-5
        softmax = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
        assert abs(scores[0] - softmax.max()) < 1e-5
    raw = post(f"{base_url}/classify", {"inputs": TEXTS[0], "raw_scores": True, "top_k": 2}).json()
    assert len(raw[0]) == 2
    assert abs(raw[0][0]["score"] - float(logits[0].max())) < 1e-4


def test_openai_client_float_and_base64(base_url: str, tiny_bundle: Path) -> None:
    from openai import OpenAI

    expected = unit(reference(tiny_bundle, TEXTS)[0])
    client = OpenAI(base_url=f"{base_url}/v1", api_key="unused")
    for encoding_format in ("float", "base64"):
        result = client.embeddings.create(model="tiny", input=TEXTS, encoding_format=encoding_format)
        vectors = [item.embedding for item in sorted(result.data, key=lambda item: item.index)]
        if encoding_format == "base64" and isinstance(vectors[0], str):
            vectors = [np.frombuffer(base64.b64decode(vector), dtype="<f4") for vector in vectors]
        np.testing.assert_allclose(np.array(vectors, dtype=np.float32), expected, rtol=1e-4, atol=1e-5)
        assert result.usage.prompt_tokens > len(TEXTS)
    short = client.embeddings.create(model="tiny", input="a cat", dimensions=4)
    assert len(short.data[0].embedding) == 4


def test_health_ready_info(base_url: str) -> None:
    assert httpx.get(f"{base_url}/health").status_code == 200
    assert httpx.get(f"{base_url}/ready").status_code == 200
    info = httpx.get(f"{base_url}/info").json()
    assert info["labels"] == ["animal", "plant", "tool"]
    assert info["max_seq_len"] == 32 and info["variant"] == "fp32" and info["provider"] == "cpu"
    assert info["batching"]["max_client_batch"] == 1024
    assert httpx.get(f"{base_url}/docs").status_code == 200


@pytest.mark.parametrize(
    ("route", "payload"),
    [
        ("/embed", "{not json"),
        ("/embed", {"inputs": 5}),
        ("/embed", {"inputs": []}),
        ("/embed", {"inputs": ""}),
        ("/embed", {"inputs": ["fine", ""]}),
        ("/embed", {"inputs": [LONG_TEXT], "truncate": False}),
        ("/embed", {"inputs": "a cat", "dimensions": 0}),
        ("/embed", {"inputs": "a cat", "dimensions": 33}),
        ("/classify", {"inputs": "a cat", "top_k": 0}),
        ("/classify", {"inputs": "a cat", "top_k": 4}),
        ("/v1/embeddings", {"input": []}),
        ("/v1/embeddings", {"input": "a cat", "encoding_format": "hex"}),
        ("/v1/embeddings", {"input": "a cat", "dimensions": 1000}),
    ],
)
def test_invalid_requests_are_422_json(base_url: str, route: str, payload: object) -> None:
    if isinstance(payload, str):
        response = httpx.post(
            f"{base_url}{route}", content=payload, headers={"content-type": "application/json"}
        )
    else:
        response = post(f"{base_url}{route}", payload)
    assert_error(response, 422, "Validation")


def test_unknown_route_and_method_are_json(base_url: str) -> None:
    assert_error(httpx.get(f"{base_url}/nope"), 404, "NotFound")
    assert_error(httpx.get(f"{base_url}/embed"), 405, "MethodNotAllowed")


def error_message(response: httpx.Response) -> str:
    body = response.json()
    return body["error"]["message"] if response.request.url.path.startswith("/v1/") else body["error"]


@pytest.mark.parametrize(
    ("route", "body", "field"),
    [  # raw bodies: a JSON escape is the only way a client can send a lone surrogate
        ("/embed", r'{"inputs": "a\ud800b"}', "inputs"),
        ("/embed", r'{"inputs": ["a cat", "\udfff"]}', "inputs"),
        ("/classify", r'{"inputs": "a\ud800b"}', "inputs"),
        ("/v1/embeddings", r'{"input": "a\ud800b"}', "input"),
        ("/v1/embeddings", r'{"input": "a cat", "model": "\ud800"}', "model"),
    ],
)
def test_lone_surrogate_is_422_naming_the_field_before_any_work(
    base_url: str, route: str, body: str, field: str
) -> None:
    tokenized_before = metric_value(base_url, TOKENIZED)
    response = httpx.post(f"{base_url}{route}", content=body, headers={"content-type": "application/json"})
    assert_error(response, 422, "Validation")
    assert error_message(response).startswith(f"{field}: ") and "surrogate" in error_message(response)
    assert metric_value(base_url, TOKENIZED) == tokenized_before


@pytest.mark.parametrize(
    ("route", "payload", "field"),
    [  # each value would be coerced to a valid one by a lax parser (the old code answered 200)
        ("/embed", {"inputs": "a cat", "dimensions": True}, "dimensions"),
        ("/embed", {"inputs": "a cat", "dimensions": "16"}, "dimensions"),
        ("/embed", {"inputs": "a cat", "truncate": "no"}, "truncate"),
        ("/embed", {"inputs": "a cat", "normalize": "yes"}, "normalize"),
        ("/classify", {"inputs": "a cat", "top_k": "3"}, "top_k"),
        ("/classify", {"inputs": "a cat", "raw_scores": 1}, "raw_scores"),
        ("/v1/embeddings", {"input": "a cat", "dimensions": True}, "dimensions"),
    ],
)
def test_no_type_coercion_each_rejection_names_the_field(
    base_url: str, route: str, payload: object, field: str
) -> None:
    response = post(f"{base_url}{route}", payload)
    assert_error(response, 422, "Validation")
    assert error_message(response).startswith(f"{field}: ")
    if route.startswith("/v1/"):
        assert response.json()["error"]["param"] == field


EXPECTED_INPUTS = "expected a string, an array of token IDs, or an array of those"
EXPECTED_INPUT = "expected a string or an array of token IDs (integers)"


@pytest.mark.parametrize(
    ("route", "payload", "message"),
    [
        ("/embed", {"inputs": 5}, f"inputs: {EXPECTED_INPUTS}, got integer"),
        ("/embed", {"inputs": None}, f"inputs: {EXPECTED_INPUTS}, got null"),
        ("/embed", {"inputs": ["a cat", 5]}, f"inputs: input 1: {EXPECTED_INPUT}, got integer"),
        ("/v1/embeddings", {"input": {"text": "a cat"}}, f"input: {EXPECTED_INPUTS}, got object"),
    ],
)
def test_wrong_input_type_says_what_was_expected(
    base_url: str, route: str, payload: object, message: str
) -> None:
    response = post(f"{base_url}{route}", payload)
    assert_error(response, 422, "Validation")
    assert error_message(response) == message


@pytest.mark.parametrize("route", ["/embed", "/v1/embeddings"])
def test_malformed_json_names_line_and_column(base_url: str, route: str) -> None:
    body = '{\n  "inputs": [\n    "a cat",\n  ]\n}'  # the trailing comma: line 4, column 3
    response = httpx.post(f"{base_url}{route}", content=body, headers={"content-type": "application/json"})
    assert_error(response, 422, "Validation")
    assert "line 4 column 3" in error_message(response)
    if route.startswith("/v1/"):
        assert response.json()["error"]["param"] is None  # no field is at fault, and an offset is no param


def test_read_only_routes_answer_head(base_url: str) -> None:
    for path in ("/health", "/ready", "/info", "/metrics"):
        response = httpx.head(f"{base_url}{path}")
        assert response.status_code == 200 and response.content == b""


def test_limits_too_many_inputs_and_payload_too_large(limited_url: str) -> None:
    assert post(f"{limited_url}/embed", {"inputs": ["a cat"] * 8}).status_code == 200
    assert_error(post(f"{limited_url}/embed", {"inputs": ["a cat"] * 9}), 422, "Validation")
    assert_error(post(f"{limited_url}/v1/embeddings", {"input": ["a cat"] * 9}), 422, "Validation")
    big = {"inputs": ["x" * 5000]}
    assert_error(post(f"{limited_url}/embed", big), 413, "PayloadTooLarge")
    assert_error(post(f"{limited_url}/v1/embeddings", {"input": "x" * 5000}), 413, "PayloadTooLarge")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while the body streams in
        yield b'{"inputs": ["'
        yield b"x" * 5000
        yield b'"]}'

    chunked = httpx.post(
        f"{limited_url}/embed", content=chunks(), headers={"content-type": "application/json"}
    )
    assert_error(chunked, 413, "PayloadTooLarge")
    info = httpx.get(f"{limited_url}/info").json()
    assert info["variant"] == "int8"  # auto on CPU picks the bundle's int8 file


def test_overload_answers_429_then_keeps_serving(limited_url: str) -> None:
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=64)) as client:
            payload = {"inputs": [TEXTS[2]] * 8}
            return await asyncio.gather(
                *(client.post(f"{limited_url}/embed", json=payload) for _ in range(64))
            )

    tokenized_before = metric_value(limited_url, TOKENIZED)
    responses = asyncio.run(burst())
    statuses = [response.status_code for response in responses]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(429) > 0 and statuses.count(200) > 0
    overloaded = next(response for response in responses if response.status_code == 429)
    assert_error(overloaded, 429, "Overloaded")
    assert overloaded.headers["retry-after"].isdigit()
    # Admission comes before tokenising: only the requests that were served were tokenised.
    tokenized = metric_value(limited_url, TOKENIZED) - tokenized_before
    assert tokenized == statuses.count(200)
    assert post(f"{limited_url}/embed", {"inputs": TEXTS}).status_code == 200
    assert httpx.get(f"{limited_url}/ready").status_code == 200
    metrics = httpx.get(f"{limited_url}/metrics").text
    assert f'encoder_rejected_total{{model="tiny",reason="queue_full"}} {statuses.count(429)}.0' in metrics


def raw_exchange(url: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read until the server closes the connection; status, headers and body."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as connection:
        connection.sendall(request)
        received = b""
        while chunk := connection.recv(65536):  # blocks until the server answers and closes
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {
        name.lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)
    }
    return int(status_line.split()[1]), headers, body


@pytest.fixture(scope="module")
def impatient_url(tiny_bundle: Path) -> Iterator[str]:
    with running_service(tiny_bundle, header_timeout_s=1, body_timeout_s=1) as url:
        yield url


@pytest.mark.parametrize(
    ("request_bytes", "status", "error_type", "reason"),
    [
        # headers that stop half-way (a slowloris sender), on the TEI and the OpenAI route
        (b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Ty", 408, "RequestTimeout", "request_timeout"),
        (b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n", 408, "RequestTimeout", "request_timeout"),
        # a body shorter than its Content-Length
        (
            b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"inputs": "a cat"',
            408,
            "RequestTimeout",
            "request_timeout",
        ),
        # malformed framing: a Content-Length that is not a number, a chunk size that is not hex
        (
            b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n",
            400,
            "MalformedHttp",
            "malformed_http",
        ),
        (
            b"POST /embed HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n",
            400,
            "MalformedHttp",
            "malformed_http",
        ),
    ],
)
def test_slow_or_malformed_requests_get_json_and_a_closed_connection(
    impatient_url: str, request_bytes: bytes, status: int, error_type: str, reason: str
) -> None:
    series = f'encoder_rejected_total{{model="",reason="{reason}"}}'
    before = metric_value(impatient_url, series)
    answered, headers, body = raw_exchange(impatient_url, request_bytes)
    assert answered == status
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    decoded = json.loads(body)
    if b" /v1/" in request_bytes:
        assert decoded["error"]["code"] == error_type and decoded["error"]["message"]
    else:
        assert decoded["error_type"] == error_type and decoded["error"]
    assert metric_value(impatient_url, series) == before + 1
    assert post(f"{impatient_url}/embed", {"inputs": "a cat"}).status_code == 200  # and it keeps serving


def test_api_key_and_deadline(tiny_bundle: Path) -> None:
    # A deadline shorter than any request can meet: every inference request answers 504.
    with running_service(tiny_bundle, api_key="s3cret", request_timeout_s=0.000001) as url:
        assert_error(post(f"{url}/embed", {"inputs": "a cat"}), 401, "Unauthorized")
        wrong = post(f"{url}/v1/embeddings", {"input": "a cat"}, headers={"authorization": "Bearer nope"})
        assert_error(wrong, 401, "Unauthorized")
        assert_error(httpx.get(f"{url}/info"), 401, "Unauthorized")
        for open_path in ("/health", "/ready", "/metrics"):
            assert httpx.get(f"{url}{open_path}").status_code == 200
        authorized = {"authorization": "Bearer s3cret"}
        assert httpx.get(f"{url}/info", headers=authorized).status_code == 200
        assert_error(post(f"{url}/embed", {"inputs": "a cat"}, headers=authorized), 504, "Timeout")
        assert_error(post(f"{url}/v1/embeddings", {"input": "a cat"}, headers=authorized), 504, "Timeout")


def test_sigterm_drains_without_losing_a_request(tiny_bundle: Path) -> None:
    # Batching off and 8192 queued texts: the queued work takes seconds to drain (a minute on a loaded
    # machine, hence a request deadline well beyond that: this test is about the drain, not deadlines).
    service = ServiceProcess(
        tiny_bundle, max_batch_size=1, max_queue_items=10000, variant="fp32", request_timeout_s=150
    )
    requests, texts_per_request = 32, 256
    with service:

        async def scenario() -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=requests)
            async with httpx.AsyncClient(timeout=180, limits=limits) as client:
                payload = {"inputs": [f"{TEXTS[2]} {index}" for index in range(texts_per_request)]}
                url = f"{service.base_url}/embed"
                work = [asyncio.create_task(client.post(url, json=payload)) for _ in range(requests)]
                async with httpx.AsyncClient(timeout=10) as probe:  # new connections, as a load balancer's

                    async def poll_until(condition: Callable[[], Awaitable[bool]]) -> None:
                        deadline = time.monotonic() + 120  # generous: the suite shares a loaded machine
                        while not await condition():
                            assert time.monotonic() < deadline, "condition not met in time"
                            await asyncio.sleep(0.02)

                    async def all_accepted() -> bool:
                        # Tokenised means accepted: past the readiness check, counted in flight.
                        metrics = (await probe.get(f"{service.base_url}/metrics")).text
                        return metric_in(metrics, TOKENIZED) >= requests

                    async def not_ready() -> bool:
                        return (await probe.get(f"{service.base_url}/ready")).status_code == 503

                    await poll_until(all_accepted)
                    service.process.send_signal(signal.SIGTERM)
                    await poll_until(not_ready)
                    refused = await probe.post(url, json={"inputs": "a cat"})
                assert_error(refused, 503, "Unhealthy")
                return await asyncio.gather(*work)

        responses = asyncio.run(scenario())
        assert [response.status_code for response in responses] == [200] * requests
        assert all(len(response.json()) == texts_per_request for response in responses)
        assert service.process.wait(30) == 0
        assert "draining" in service.log()


TOKENIZED = 'encoder_tokenize_duration_seconds_count{model="tiny"}'
QUEUED = 'encoder_queue_items{model="tiny"}'
DISCONNECTED = 'encoder_rejected_total{model="tiny",reason="client_disconnected"}'
BATCHED_ITEMS = 'encoder_batch_size_count{model="tiny"}'


def metric_in(exposition: str, series: str) -> float:
    for line in exposition.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} not exposed")


def metric_value(base_url: str, series: str) -> float:
    return metric_in(httpx.get(f"{base_url}/metrics").text, series)


def wait_for(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_disconnected_client_items_are_dropped_before_they_run(tiny_bundle: Path) -> None:
    # Batching off: one item per batch, the two requests taking turns (fair scheduling), so while the
    # second request is queued at most about as many of its items run as of the first's.
    first_items, second_items = 3000, 1000
    with running_service(tiny_bundle, max_batch_size=1, max_client_batch=first_items) as url:
        host, port = url.removeprefix("http://").split(":")
        texts = [f"{LONG_TEXT} {index}" for index in range(first_items)]
        body = json.dumps({"inputs": texts[:second_items]}).encode()
        raw_request = (
            b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )

        def second_request_queued() -> bool:
            # Every item of the first request is queued, running (at most one) or counted as run; more
            # than that means the second request's items are in the queue.
            exposition = httpx.get(f"{url}/metrics").text
            queued = metric_in(exposition, QUEUED)
            return queued + metric_in(exposition, BATCHED_ITEMS) > first_items

        with concurrent.futures.ThreadPoolExecutor(1) as background:
            first = background.submit(httpx.post, f"{url}/embed", json={"inputs": texts}, timeout=120)
            wait_for(lambda: metric_value(url, QUEUED) > 0)
            with socket.create_connection((host, int(port))) as impatient:
                impatient.sendall(raw_request)
                wait_for(second_request_queued)
            wait_for(lambda: metric_value(url, DISCONNECTED) == 1)
            assert first.result().status_code == 200
        wait_for(lambda: metric_value(url, QUEUED) == 0)
        # Had its items not been dropped, all 1,000 would have run after the disconnect.
        assert metric_value(url, BATCHED_ITEMS) < first_items + second_items
        assert post(f"{url}/embed", {"inputs": "a cat"}).status_code == 200


def test_bad_bundle_refuses_to_start_with_one_line(tiny_bundle: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for source in tiny_bundle.iterdir():
        (bad / source.name).write_bytes(source.read_bytes())
    with open(bad / "model.int8.onnx", "ab") as tampered:
        tampered.write(b"\0")
    port = free_port()
    finished = subprocess.run(
        [sys.executable, "-m", "encoder_cli", "serve", "--bundle", str(bad), "--port", str(port)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert finished.returncode == 2
    lines = finished.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.int8.onnx" in lines[0] and "sha256" in lines[0], finished.stderr
    (bad / "manifest.json").write_text('{"format_version": 1}')
    finished = subprocess.run(
        [sys.executable, "-m", "encoder_cli", "serve", "--bundle", str(bad)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert finished.returncode == 2 and "manifest.json" in finished.stderr
    assert len(finished.stderr.strip().splitlines()) == 1


def test_metrics_pass_promtool_and_count_requests(base_url: str, tmp_path: Path) -> None:
    exposition = httpx.get(f"{base_url}/metrics").text
    for name in (
        "encoder_requests_total",
        "encoder_request_duration_seconds",
        "encoder_queue_wait_seconds",
        "encoder_tokenize_duration_seconds",
        "encoder_inference_duration_seconds",
        "encoder_batch_size",
        "encoder_batch_tokens",
        "encoder_batch_padding_ratio",
        "encoder_queue_items",
        "encoder_input_tokens_total",
        "encoder_truncated_inputs_total",
        "encoder_rejected_total",
    ):
        assert f"\n{name}" in exposition, name
    assert 'encoder_model_info{model="tiny",name="tiny",provider="cpu",variant="fp32",version=' in exposition
    checked = subprocess.run(
        ["promtool", "check", "metrics"], input=exposition, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_prometheus_scrapes_the_service(base_url: str, tmp_path: Path) -> None:
    host_port = base_url.removeprefix("http://")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        f"scrape_configs:\n  - job_name: encoder\n    static_configs:\n      - targets: ['{host_port}']\n"
    )
    for _ in range(3):
        assert post(f"{base_url}/embed", {"inputs": "a cat"}).status_code == 200
    expected = float(
        httpx.get(f"{base_url}/metrics")
        .text.split('encoder_requests_total{model="tiny",route="/embed",status="200"} ')[1]
        .split()[0]
    )
    port = free_port()
    prometheus = subprocess.Popen(
        [
            "/usr/bin/prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        query = 'encoder_requests_total{route="/embed",status="200"}'
        value = None
        deadline = time.monotonic() + 120  # generous: the suite shares a loaded machine
        while time.monotonic() < deadline:
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": query}).json()
                results = answer["data"]["result"]
                if results:
                    value = float(results[0]["value"][1])
                    if value >= expected:
                        break
            except (httpx.TransportError, ValueError):  # not up yet, or a plain-text answer while starting
                pass
            time.sleep(0.5)
        assert value is not None and value >= expected
    finally:
        prometheus.terminate()
        prometheus.wait(20)


def test_schemathesis_finds_no_server_error(base_url: str, tmp_path: Path) -> None:
    schemathesis = Path(sys.executable).parent / "schemathesis"
    finished = subprocess.run(
        [
            str(schemathesis),
            "run",
            f"{base_url}/openapi.json",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "40",
            "--seed",
            "1",
        ],
        cwd=tmp_path,  # schemathesis keeps its example database in the working directory
        capture_output=True,
        text=True,
        timeout=360,  # 40 examples for each of a dozen operations; generous: the machine is shared
    )
    assert finished.returncode == 0, finished.stdout[-4000:]
    assert "passed" in finished.stdout
