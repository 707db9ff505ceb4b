"""Pick the batching defaults by measurement: the service under the same load with several batching
settings, measured in interleaved rounds so that every setting sees the same background load.

    python bench/batching_sweep.py --bundle bundles/default --concurrency 32 \\
        --configs "max_batch_size=8;max_batch_size=32;max_batch_size=32,max_batch_tokens=1024"

Prints one line per setting (median texts/s and p50/p99 over the rounds) and, last, one JSON object.
"""

import argparse
import asyncio
import json
import statistics
from pathlib import Path

from loadgen import run_load

from service.process import ServiceProcess

REPO_ROOT = Path(__file__).resolve().parent.parent


def parse_configs(text: str) -> dict[str, dict[str, str]]:
    configs = {}
    for config in text.split(";"):
        pairs = [pair.split("=") for pair in config.split(",") if pair]
        configs[config] = {name.strip(): value.strip() for name, value in pairs}
    return configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=REPO_ROOT / "bundles" / "default")
    parser.add_argument("--configs", required=True, help="settings per config, ';' between configs")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--texts-per-request", type=int, default=8)
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    configs = parse_configs(args.configs)
    services = {name: ServiceProcess(args.bundle, **settings) for name, settings in configs.items()}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in configs}
    try:
        for service in services.values():
            service.wait_ready()
        for _ in range(args.rounds):
            for name, service in services.items():
                load = run_load(
                    service.base_url, args.concurrency, args.texts_per_request, duration_s=args.duration
                )
                result = asyncio.run(load)
                results[name].append(
                    {"texts_per_s": result.texts_per_s, "p50": result.p50_ms, "p99": result.p99_ms}
                )
    finally:
        for service in services.values():
            service.stop()
    summary = {}
    for name, runs in results.items():
        summary[name] = {
            key: round(statistics.median(run[key] for run in runs), 1)
            for key in ("texts_per_s", "p50", "p99")
        }
        print(f"{name or 'defaults':50s} {summary[name]}")
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
