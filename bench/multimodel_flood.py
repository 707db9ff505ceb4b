"""One model flooded, the other measured: how much a busy model slows a calm one in the same process
(issue 13).

    python bench/multimodel_flood.py --bundle bundles/default --requests 2000

One service (`encoder serve --bundle calm=DIR --bundle busy=DIR`, defaults otherwise: each model its
own session, batcher and queue, the intra-op threads shared out among the models). Four one-text
clients send `--requests` requests to /models/calm/embed, first alone, then while `--flood-clients`
connections send 256-text requests to /models/busy/embed back to back, more than its queue holds (so
the busy model answers 429s). Reports the calm model's p50/p99 in both phases and their ratio, and
the busy model's statuses. Lengths are counted in requests. Prints a Markdown table and, as its last
line, the result as one JSON object.
"""

import argparse
import asyncio
import json
from dataclasses import asdict
from pathlib import Path

import httpx
from loadgen import LoadResult, run_load

from service.process import ServiceProcess

FLOOD_TEXTS = 256


async def calm_with_flood(url: str, requests: int, flood_clients: int) -> LoadResult:
    """The calm model's load while the busy model is flooded; the flood runs until the calm load ends."""
    flood = asyncio.create_task(
        run_load(
            url, flood_clients, FLOOD_TEXTS, requests=10**9, duration_s=10**6, route="/models/busy/embed"
        )
    )
    # The flood has filled the busy queue once a 429 can be seen: poll its metrics, not the clock.
    while busy_statuses(url).get("429", 0) == 0:
        await asyncio.sleep(0.05)
    calm = await run_load(url, 4, 1, requests=requests, duration_s=10**6, route="/models/calm/embed")
    flood.cancel()
    return calm


def busy_statuses(url: str) -> dict[str, int]:
    """The busy model's /embed answers so far, by status, from the service's own counters."""
    prefix = 'encoder_requests_total{model="busy",route="/embed",status="'
    with httpx.Client(timeout=30) as client:
        lines = client.get(f"{url}/metrics").text.splitlines()
    return {
        line.removeprefix(prefix)[:3]: int(float(line.split()[-1]))
        for line in lines
        if line.startswith(prefix)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=Path("bundles/default"))
    parser.add_argument(
        "--requests", type=int, default=2000, help="one-text requests to the calm model per phase"
    )
    parser.add_argument("--flood-clients", type=int, default=48)
    args = parser.parse_args()
    bundles = f"calm={args.bundle},busy={args.bundle}"
    with ServiceProcess(args.bundle, ENCODER_BUNDLE=bundles) as service:
        # Warm both models' paths before measuring.
        asyncio.run(run_load(service.base_url, 4, 1, requests=200, route="/models/calm/embed"))
        alone = asyncio.run(
            run_load(service.base_url, 4, 1, requests=args.requests, route="/models/calm/embed")
        )
        flooded = asyncio.run(calm_with_flood(service.base_url, args.requests, args.flood_clients))
        busy = busy_statuses(service.base_url)
    ratio = round(flooded.p50_ms / alone.p50_ms, 2)
    print("| calm model, 4 one-text clients | p50 ms | p99 ms | requests/s |")
    print("|---|---|---|---|")
    print(f"| busy model idle | {alone.p50_ms} | {alone.p99_ms} | {alone.requests_per_s} |")
    print(f"| busy model flooded | {flooded.p50_ms} | {flooded.p99_ms} | {flooded.requests_per_s} |")
    print(f"\np50 ratio {ratio}; the busy model's answers by status: {busy}")
    result = {"alone": asdict(alone), "flooded": asdict(flooded), "p50_ratio": ratio, "busy_statuses": busy}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
