"""Load generator for the service: N concurrent keep-alive connections, each sending one request after
another, until a request count or a time cap; reports requests/s, texts/s, latency percentiles, errors.

    python bench/loadgen.py --url http://127.0.0.1:8000 --concurrency 32 --texts-per-request 8 --duration 10

The client is a minimal HTTP/1.1 speaker on asyncio streams (pre-encoded requests, Content-Length
responses): on a 2-core machine the load generator shares the CPU with the server, and a full HTTP
client library would cost more CPU per request than the server's own overhead. The last stdout line
is the result as one JSON object.
"""

import argparse
import asyncio
import json
import random
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

WORDS = [
    word
    for line in (
        "the a of and to in is was for on that with as by at from his her it an are were which be this has",
        "had not but or have they one you all their there been if more when will would who so no time people",
        "year way day man thing woman life child world school state family student group country problem",
        "part place case week company system program question work government number night point home water",
        "room mother area money story fact month lot right study book eye job word business issue side kind",
        "head house service friend father power hour game line end member law car city community name team",
        "minute idea body information back parent face level office door health person art war history party",
        "result change morning reason research moment air teacher force education dog cat tree river small",
        "large green old new quick brown jumps over lazy bright dark cold warm",
    )
    for word in line.split()
]


def make_texts(count: int, seed: int = 0, min_words: int = 4, max_words: int = 40) -> list[str]:
    """Deterministic English-like sentences of varied length (a few to ~60 tokens)."""
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))).capitalize() + "."
        for _ in range(count)
    ]


def request_bodies(route: str, texts_per_request: int, variants: int = 64, seed: int = 0) -> list[bytes]:
    texts = make_texts(variants * texts_per_request, seed)
    key = "input" if route.startswith("/v1/") else "inputs"
    chunks = [texts[index : index + texts_per_request] for index in range(0, len(texts), texts_per_request)]
    return [json.dumps({key: chunk}).encode() for chunk in chunks]


@dataclass
class LoadResult:
    concurrency: int
    texts_per_request: int
    requests: int
    ok: int
    errors: dict[str, int]
    seconds: float
    requests_per_s: float
    texts_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p99_ms_by_status: dict[str, float]


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


async def _connection(
    host: str,
    port: int,
    requests: list[bytes],
    budget: list[int],
    stop_at: float,
    latencies: list[float],
    statuses: Counter[str],
    by_status: dict[str, list[float]],
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    turn = 0
    try:
        while budget[0] > 0 and time.perf_counter() < stop_at:
            budget[0] -= 1
            request = requests[turn % len(requests)]
            turn += 1
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = head[9:12].decode()
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            by_status.setdefault(status, []).append(latencies[-1])
            statuses[status] += 1
            if b"connection: close" in head.lower():
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
    finally:
        writer.close()


async def run_load(
    url: str,
    concurrency: int,
    texts_per_request: int,
    requests: int = 1_000_000,
    duration_s: float = 10.0,
    route: str = "/embed",
    api_key: str | None = None,
) -> LoadResult:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    headers = f"POST {route} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
    if api_key:
        headers += f"Authorization: Bearer {api_key}\r\n"
    encoded = [
        f"{headers}Content-Length: {len(body)}\r\n\r\n".encode() + body
        for body in request_bodies(route, texts_per_request)
    ]
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    by_status: dict[str, list[float]] = {}
    budget = [requests]
    started = time.perf_counter()
    stop_at = started + duration_s
    # Each connection starts at a different request so concurrent requests carry different texts.
    await asyncio.gather(
        *(
            _connection(
                host, port, encoded[index:] + encoded[:index], budget, stop_at, latencies, statuses, by_status
            )
            for index in range(concurrency)
        )
    )
    seconds = time.perf_counter() - started
    ok = statuses.pop("200", 0)
    done = sorted(latencies)
    return LoadResult(
        concurrency=concurrency,
        texts_per_request=texts_per_request,
        requests=len(latencies),
        ok=ok,
        errors=dict(statuses),
        seconds=round(seconds, 3),
        requests_per_s=round(ok / seconds, 1),
        texts_per_s=round(ok * texts_per_request / seconds, 1),
        p50_ms=round(percentile(done, 0.50) * 1000, 2),
        p90_ms=round(percentile(done, 0.90) * 1000, 2),
        p99_ms=round(percentile(done, 0.99) * 1000, 2),
        p99_ms_by_status={
            status: round(percentile(sorted(values), 0.99) * 1000, 2) for status, values in by_status.items()
        },
    )


WRK_SCRIPT = Path(__file__).with_name("wrk_bodies.lua")


def run_wrk(
    url: str, concurrency: int, texts_per_request: int, duration_s: float, route: str = "/embed"
) -> LoadResult:
    """The same load through wrk (C, one thread), when it is installed: on a small machine the client
    shares the CPU with the server, and wrk costs it far less per request than this asyncio client."""
    with tempfile.NamedTemporaryFile("wb", suffix=".jsonl") as bodies:
        bodies.write(b"\n".join(request_bodies(route, texts_per_request)) + b"\n")
        bodies.flush()
        finished = subprocess.run(
            [
                "wrk",
                "-t",
                "1",
                "-c",
                str(concurrency),
                "-d",
                f"{max(1, round(duration_s))}s",
                "--timeout",
                "60s",
                "-s",
                str(WRK_SCRIPT),
                url + route,
                "--",
                bodies.name,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    result = json.loads(finished.stdout.strip().splitlines()[-1])
    seconds, requests = result["duration_s"], result["requests"]
    errors = result["non_2xx"] + result["socket_errors"]
    return LoadResult(
        concurrency=concurrency,
        texts_per_request=texts_per_request,
        requests=requests,
        ok=requests - errors,
        errors={"non-2xx or socket": errors} if errors else {},
        seconds=round(seconds, 3),
        requests_per_s=round((requests - errors) / seconds, 1),
        texts_per_s=round((requests - errors) * texts_per_request / seconds, 1),
        p50_ms=round(result["p50_ms"], 2),
        p90_ms=round(result["p90_ms"], 2),
        p99_ms=round(result["p99_ms"], 2),
        p99_ms_by_status={},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--route", default="/embed", choices=["/embed", "/classify", "/v1/embeddings"])
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--texts-per-request", type=int, default=1)
    parser.add_argument("--requests", type=int, default=1_000_000, help="stop after this many requests")
    parser.add_argument("--duration", type=float, default=10.0, help="stop after this many seconds")
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args()
    result = asyncio.run(
        run_load(
            args.url,
            args.concurrency,
            args.texts_per_request,
            args.requests,
            args.duration,
            args.route,
            args.api_key,
        )
    )
    print(json.dumps(asdict(result)), flush=True)


if __name__ == "__main__":
    main()
