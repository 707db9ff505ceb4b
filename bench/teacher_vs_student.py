"""Serve a teacher and its distilled student with the same service on the same machine, and compare
their throughput: the two services run side by side and take turns, round after round, so both see
the same background load.

    python bench/teacher_vs_student.py --teacher bundles/minilm --student bundles/distilled \
        --concurrency 32 --requests 300 --rounds 3

Each point is a fixed number of requests of 8 English-like texts (bench/loadgen.py). The last stdout
line is the result as one JSON object.
"""

import argparse
import asyncio
import json
import statistics
from dataclasses import asdict
from pathlib import Path

from loadgen import run_load

from service.process import ServiceProcess


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--student", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--texts-per-request", type=int, default=8)
    parser.add_argument("--requests", type=int, default=300, help="requests per point")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    bundles = {"teacher": args.teacher, "student": args.student}
    services = {name: ServiceProcess(bundle) for name, bundle in bundles.items()}
    rates: dict[str, list[float]] = {name: [] for name in bundles}
    points: list[dict[str, object]] = []
    try:
        for service in services.values():
            service.wait_ready()
        for service in services.values():  # warm-up: first requests allocate buffers
            asyncio.run(run_load(service.base_url, args.concurrency, args.texts_per_request, requests=50))
        for round_number in range(1, args.rounds + 1):
            for name, service in services.items():
                result = asyncio.run(
                    run_load(
                        service.base_url,
                        args.concurrency,
                        args.texts_per_request,
                        requests=args.requests,
                        duration_s=600.0,
                    )
                )
                rates[name].append(result.texts_per_s)
                points.append({"round": round_number, "model": name, **asdict(result)})
                print(
                    f"round {round_number} {name}: {result.texts_per_s:.0f} texts/s, p50 {result.p50_ms} ms"
                )
    finally:
        for service in services.values():
            service.stop()
    medians = {name: statistics.median(values) for name, values in rates.items()}
    summary = {
        "concurrency": args.concurrency,
        "texts_per_request": args.texts_per_request,
        "median_texts_per_s": medians,
        "student_vs_teacher": round(medians["student"] / medians["teacher"], 2),
        "points": points,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
