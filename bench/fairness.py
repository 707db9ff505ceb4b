"""Fair scheduling and admission under mixed load, measured side by side in one run (issue 11).

    python bench/fairness.py --bundle bundles/default

One service (`encoder serve`, defaults) and three measurements:

1. Fairness. Eight clients send one-text requests back to back, first alone (the baseline), then
   while one more client sends 1,000-text requests back to back; then the big client alone. Reports
   the small clients' p50/p99 and requests/s in both phases, and total texts/s (small + big).
   Targets: with the big client, the small clients' p99 stays within 3x the baseline's and total
   texts/s does not drop more than 10%.
2. Flood, two ways, each with the texts/s the service still served meanwhile:
   - closed loop: many connections each send 1,000-text requests back to back, resending as soon as
     they are answered (clients that ignore Retry-After). The refusals' latency is then the
     connections divided by the refusals per second (Little's law), whatever one refusal costs;
   - open loop: 1,000-text requests sent at fixed rates, far beyond what the service can serve,
     each on a new connection, each timed from the moment it was due (so a slow answer cannot
     delay the next request and hide itself): how fast a 429 is answered under such a flood.
     Target (issue 11): p99 in single-digit milliseconds.
3. Deadline. With a 1 s request deadline, one request of 1,024 inputs of 4,000 characters (seconds
   of tokenising): reports when its 504 arrives.

Lengths are counted in requests. Prints a Markdown table and, as its last line, the result as one JSON
object.
"""

import argparse
import asyncio
import json
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from loadgen import LoadResult, make_texts, percentile, run_load

from service.process import ServiceProcess

BIG_TEXTS = 1000


async def big_client(url: str, texts: list[str], stop: asyncio.Event) -> tuple[int, float, dict[int, int]]:
    """1,000-text requests back to back until `stop`; texts served, the seconds it ran, and the statuses
    (a 504 when the request's share of the runtime cannot finish it within the deadline)."""
    served, started, statuses = 0, time.perf_counter(), Counter[int]()
    async with httpx.AsyncClient(timeout=300) as client:
        while not stop.is_set():
            response = await client.post(f"{url}/embed", json={"inputs": texts})
            statuses[response.status_code] += 1
            served += len(texts) if response.status_code == 200 else 0
    return served, time.perf_counter() - started, dict(statuses)


async def small_with_big(
    url: str, small_requests: int, big_texts: list[str]
) -> tuple[LoadResult, int, float, dict[int, int]]:
    stop = asyncio.Event()
    big = asyncio.create_task(big_client(url, big_texts, stop))
    await asyncio.sleep(1.0)  # let the big client's first request fill the queue before the small start
    small = await run_load(url, 8, 1, requests=small_requests, duration_s=3600)
    stop.set()
    served, seconds, statuses = await big
    return small, served, seconds, statuses


def fairness(url: str, small_requests: int, big_requests: int) -> dict[str, object]:
    big_texts = make_texts(BIG_TEXTS, seed=7)
    baseline = asyncio.run(run_load(url, 8, 1, requests=small_requests, duration_s=3600))
    mixed, big_served, big_seconds, big_statuses = asyncio.run(small_with_big(url, small_requests, big_texts))
    alone = asyncio.run(run_load(url, 1, BIG_TEXTS, requests=big_requests, duration_s=3600))
    # Total texts/s with the big client: the small clients' texts in their window plus the big client's
    # over its own (slightly longer: it finishes its last request).
    mixed_total = mixed.texts_per_s + big_served / big_seconds
    return {
        "baseline": asdict(baseline),
        "with_big_client": asdict(mixed),
        "big_client_texts_per_s": round(big_served / big_seconds, 1),
        "big_client_statuses": big_statuses,
        "big_client_alone": asdict(alone),
        "p99_ratio": round(mixed.p99_ms / baseline.p99_ms, 2),
        "total_texts_per_s": {"baseline": baseline.texts_per_s, "with_big_client": round(mixed_total, 1)},
        "total_ratio": round(mixed_total / baseline.texts_per_s, 2),
    }


def embed_duration_buckets(url: str) -> dict[str, float]:
    """encoder_request_duration_seconds for /embed: cumulative count per upper bound (the server's own
    time, from the middleware to the response, without the wait for the event loop before it)."""
    buckets = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("encoder_request_duration_seconds_bucket") and 'route="/embed"' in line:
            bound = line.split('le="')[1].split('"')[0]
            buckets[bound] = float(line.split()[-1])
    return buckets


def served_texts(url: str) -> float:
    """Texts the service has run so far (encoder_batch_size_sum, over every model)."""
    return sum(
        float(line.split()[-1])
        for line in httpx.get(f"{url}/metrics").text.splitlines()
        if line.startswith("encoder_batch_size_sum")
    )


async def timed_request(host: str, port: int, request: bytes, due: float) -> tuple[str, float]:
    """Send one request on a new connection; its status and the seconds from `due` to its answer."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(value)
            for name, _, value in (line.partition(b":") for line in head.split(b"\r\n")[1:])
            if name.strip().lower() == b"content-length"
        )
        answered = time.perf_counter() - due  # the status and headers are in: the answer has come
        while length > 0:  # the body in chunks: one 4 MB read held this client's loop for milliseconds
            length -= len(await reader.read(min(length, 1 << 16)))
    finally:
        writer.close()
    return head[9:12].decode(), answered


async def open_loop(url: str, rate: float, seconds: float) -> dict[str, object]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    body = json.dumps({"inputs": make_texts(BIG_TEXTS, seed=11)}).encode()
    request = (
        f"POST /embed HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    served_before, started = served_texts(url), time.perf_counter()
    tasks = []
    for number in range(round(rate * seconds)):
        due = started + number / rate
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        tasks.append(asyncio.create_task(timed_request(host, port, request, due)))
    answers = await asyncio.gather(*tasks)
    served = (served_texts(url) - served_before) / (time.perf_counter() - started)
    refusals = sorted(seconds for status, seconds in answers if status == "429")
    statuses = Counter(status for status, _ in answers)
    return {
        "rate_per_s": rate,
        "requests": len(answers),
        "statuses": dict(statuses),
        "refusal_p50_ms": round(percentile(refusals, 0.50) * 1000, 2),
        "refusal_p99_ms": round(percentile(refusals, 0.99) * 1000, 2),
        "served_texts_per_s": round(served, 1),
    }


def flood(url: str, connections: int, requests: int) -> dict[str, object]:
    before = embed_duration_buckets(url)
    served_before, started = served_texts(url), time.perf_counter()
    result = asyncio.run(run_load(url, connections, BIG_TEXTS, requests=requests, duration_s=3600))
    served = (served_texts(url) - served_before) / (time.perf_counter() - started)
    after = embed_duration_buckets(url)
    counts = {bound: after[bound] - before[bound] for bound in after}
    total = counts["+Inf"]
    server_side = {
        f"<= {float(bound) * 1000:g} ms": round(counts[bound] / total, 3)
        for bound in ("0.005", "0.01", "0.025")
    }
    return {
        "client_side": asdict(result),
        "server_side_share_within": server_side,
        "served_texts_per_s": round(served, 1),
    }


def deadline(bundle: Path) -> dict[str, object]:
    texts = [" ".join(make_texts(40, seed=index))[:4000] for index in range(1024)]
    with ServiceProcess(bundle, request_timeout_s=1) as service:
        started = time.perf_counter()
        response = httpx.post(f"{service.base_url}/embed", json={"inputs": texts}, timeout=300)
        seconds = time.perf_counter() - started
    return {"status": response.status_code, "seconds": round(seconds, 2), "body": response.json()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=Path("bundles/default"))
    parser.add_argument("--small-requests", type=int, default=2000, help="one-text requests per phase")
    parser.add_argument("--big-requests", type=int, default=4, help="1,000-text requests, big client alone")
    parser.add_argument("--flood-connections", type=int, default=64)
    parser.add_argument("--flood-requests", type=int, default=640)
    parser.add_argument(
        "--flood-rates", default="20,50,100", help="open-loop flood: 1,000-text requests per second"
    )
    parser.add_argument("--flood-seconds", type=float, default=10.0, help="open-loop flood: per rate")
    args = parser.parse_args()
    with ServiceProcess(args.bundle) as service:
        fair = fairness(service.base_url, args.small_requests, args.big_requests)
        flooded = flood(service.base_url, args.flood_connections, args.flood_requests)
    open_floods = []
    for rate in (float(rate) for rate in args.flood_rates.split(",")):
        with ServiceProcess(args.bundle) as service:  # a fresh service: no backlog from the last rate
            open_floods.append(asyncio.run(open_loop(service.base_url, rate, args.flood_seconds)))
    late = deadline(args.bundle)
    base, mixed = fair["baseline"], fair["with_big_client"]
    assert isinstance(base, dict) and isinstance(mixed, dict)
    print("| 8 one-text clients | p50 ms | p99 ms | requests/s | total texts/s |")
    print("|---|---|---|---|---|")
    print(
        f"| alone | {base['p50_ms']} | {base['p99_ms']} | {base['requests_per_s']} | {base['texts_per_s']} |"
    )
    total = fair["total_texts_per_s"]
    assert isinstance(total, dict)
    print(
        f"| + one client of {BIG_TEXTS}-text requests | {mixed['p50_ms']} | {mixed['p99_ms']} "
        f"| {mixed['requests_per_s']} | {total['with_big_client']} |"
    )
    print(f"\nbig client: {fair['big_client_texts_per_s']} texts/s, statuses {fair['big_client_statuses']}")
    print(f"p99 ratio {fair['p99_ratio']} (target <= 3), total texts/s ratio {fair['total_ratio']} (>= 0.9)")
    client_side = flooded["client_side"]
    assert isinstance(client_side, dict)
    print(
        f"flood: {client_side['requests']} requests, statuses 200: {client_side['ok']}, others "
        f"{client_side['errors']}, p50 {client_side['p50_ms']} ms, p99 by status (ms) "
        f"{client_side['p99_ms_by_status']}; server side, share answered within "
        f"{flooded['server_side_share_within']}; served meanwhile {flooded['served_texts_per_s']} texts/s"
    )
    print("\n| open-loop flood: 1,000-text requests/s | requests | statuses | 429 p50 ms", end="")
    print(" | 429 p99 ms | served texts/s |")
    print("|---:|---:|---|---:|---:|---:|")
    for row in open_floods:
        print(
            f"| {row['rate_per_s']:g} | {row['requests']} | {row['statuses']} | {row['refusal_p50_ms']} "
            f"| {row['refusal_p99_ms']} | {row['served_texts_per_s']} |"
        )
    print(f"deadline 1 s, 1024 x 4000 characters: {late['status']} after {late['seconds']} s")
    print(json.dumps({"fairness": fair, "flood": flooded, "open_loop_floods": open_floods, "deadline": late}))


if __name__ == "__main__":
    main()
