"""Service vs. raw ONNX Runtime, and batching on vs. off, measured side by side in one run.

    python bench/side_by_side.py --bundle bundles/default

1. The ceiling: the same bundle, variant, provider and session options as the service, driven
   in-process (tokenise, pad, InferenceSession.run) on length-sorted texts at batch sizes 1..128
   and with ONNX Runtime's default thread count and the service's; the best of these is the ceiling
   (re-measured at every step, interleaved with the services), and the time of one request's texts
   as one batch is the ceiling latency.
2. The service (`encoder serve`, defaults) and the service with batching off
   (max_batch_size=1), both started once, measured at each concurrency in turn (interleaved, so that
   both see the same background load), with bench/loadgen.py, for each request shape (texts per
   request: one, the way TEI-style clients call, and 8), with the server's CPU use in cores.

Prints a Markdown table and, as its last line, the result as one JSON object. ENCODER_* variables
(e.g. ENCODER_PROVIDER=cuda) apply to the ceiling and to both services.
"""

import argparse
import asyncio
import json
import os
import shutil
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import httpx
from loadgen import LoadResult, make_texts, run_load, run_wrk

from bundle.contract import pad_to_longest
from bundle.runtime import default_intra_op_threads
from service.bundle_loader import LoadedModel, load_model
from service.process import ServiceProcess
from service.settings import Settings

REPO_ROOT = Path(__file__).resolve().parent.parent

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)


def texts_by_length(model: LoadedModel, texts: list[str]) -> list[str]:
    lengths = [len(ids) for ids in model.tokenizer.encode(texts).token_ids]
    return [text for _, text in sorted(zip(lengths, texts, strict=True))]


def ceiling_rate(model: LoadedModel, by_length: list[str], batch_size: int, seconds: float) -> float:
    """In-process texts/s: tokenise, pad and run consecutive batches of length-sorted texts (the least
    padding any batcher could achieve; tokenisation included, because the service tokenises too)."""
    done, position, started = 0, 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        chunk = by_length[position : position + batch_size] or by_length[:batch_size]
        position = (position + batch_size) % len(by_length)
        run_texts(model, chunk, model.tokenizer.pad_id)
        done += len(chunk)
    return done / (time.perf_counter() - started)


def best_configuration(
    models: dict[int, LoadedModel], by_length: list[str], seconds_per_size: float
) -> tuple[int, int, dict[str, float]]:
    """The best (intra-op threads, batch size) for raw ONNX Runtime, and every rate measured."""
    rates = {
        (threads, size): ceiling_rate(model, by_length, size, seconds_per_size)
        for threads, model in models.items()
        for size in BATCH_SIZES
    }
    threads, size = max(rates, key=rates.__getitem__)
    return threads, size, {f"{t} threads, batch {b}": round(rate, 1) for (t, b), rate in rates.items()}


def run_texts(model: LoadedModel, texts: list[str], pad_id: int) -> None:
    input_ids, attention_mask = pad_to_longest(model.tokenizer.encode(texts).token_ids, pad_id)
    model.runtime.run(input_ids, attention_mask)


def ceiling_latency_ms(
    model: LoadedModel, texts: list[str], texts_per_request: int, repeats: int = 200
) -> float:
    """Median time to tokenise and run one request's texts as one batch: the in-process floor for p50."""
    timings = []
    for index in range(repeats):
        start = (index * texts_per_request) % (len(texts) - texts_per_request)
        began = time.perf_counter()
        run_texts(model, texts[start : start + texts_per_request], model.tokenizer.pad_id)
        timings.append(time.perf_counter() - began)
    return round(statistics.median(timings) * 1000, 3)


def mean_batch_size(base_url: str) -> tuple[float, float]:
    text = httpx.get(f"{base_url}/metrics").text
    values = {"encoder_batch_size_sum": 0.0, "encoder_batch_size_count": 0.0}
    for line in text.splitlines():
        name = line.partition("{")[0]  # summed over the `model` label (one model here)
        if name in values:
            values[name] += float(line.rsplit(maxsplit=1)[1])
    return values["encoder_batch_size_sum"], values["encoder_batch_size_count"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads included (/proc/PID/stat fields 14, 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    service: ServiceProcess, concurrency: int, texts_per_request: int, duration_s: float, client: str
) -> dict[str, object]:
    base_url = service.base_url
    asyncio.run(run_load(base_url, concurrency, texts_per_request, duration_s=min(1.0, duration_s)))  # warm
    items_before, batches_before = mean_batch_size(base_url)
    cpu_before, wall_before = cpu_seconds(service.process.pid), time.perf_counter()
    if client == "wrk":
        result: LoadResult = run_wrk(base_url, concurrency, texts_per_request, duration_s)
    else:
        result = asyncio.run(run_load(base_url, concurrency, texts_per_request, duration_s=duration_s))
    cores = (cpu_seconds(service.process.pid) - cpu_before) / (time.perf_counter() - wall_before)
    items_after, batches_after = mean_batch_size(base_url)
    batches = batches_after - batches_before
    return asdict(result) | {
        "mean_batch_size": round((items_after - items_before) / max(batches, 1), 1),
        "server_cores": round(cores, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=REPO_ROOT / "bundles" / "default")
    parser.add_argument("--texts-per-request", default="1,8", help="request shapes, comma-separated")
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per measurement")
    parser.add_argument("--ceiling-seconds", type=float, default=1.5, help="seconds per batch size")
    parser.add_argument(
        "--client",
        choices=["wrk", "python"],
        default="wrk" if shutil.which("wrk") else "python",
        help="load generator: wrk (Debian's, far less CPU per request) or loadgen.py's asyncio client",
    )
    args = parser.parse_args()
    concurrencies = [int(value) for value in args.concurrency.split(",")]
    shapes = [int(value) for value in args.texts_per_request.split(",")]

    # The ceiling gets every advantage: ONNX Runtime's own default (one thread per CPU) or the
    # service's (one fewer), whichever is faster, at its best batch size.
    thread_counts = sorted({len(os.sched_getaffinity(0)), default_intra_op_threads()})
    models = {
        threads: load_model(Settings(bundle=args.bundle), args.bundle, threads) for threads in thread_counts
    }
    texts = make_texts(4096)
    by_length = texts_by_length(models[thread_counts[0]], texts)
    best_threads, best_size, rates = best_configuration(models, by_length, args.ceiling_seconds)
    model = models[best_threads]
    configurations = {"batching": {}, "batching_off": {"max_batch_size": 1}}
    results: dict[str, dict[str, dict[int, dict[str, object]]]] = {
        name: {str(shape): {} for shape in shapes} for name in configurations
    }
    ceilings: dict[int, float] = {}
    latencies: dict[str, float] = {}
    services = {name: ServiceProcess(args.bundle, **overrides) for name, overrides in configurations.items()}
    try:
        for service in services.values():
            service.wait_ready()
        # Interleaved: the ceiling and both services take turns at each step, under the same load.
        for concurrency in concurrencies:
            ceilings[concurrency] = round(ceiling_rate(model, by_length, best_size, args.duration), 1)
            for shape in shapes:
                if concurrency == min(concurrencies):
                    latencies[str(shape)] = min(
                        ceiling_latency_ms(each, texts, shape) for each in models.values()
                    )
                for name, service in services.items():
                    results[name][str(shape)][concurrency] = measure(
                        service, concurrency, shape, args.duration, args.client
                    )
    finally:
        for service in services.values():
            service.stop()

    print(
        f"\nbundle {args.bundle} ({model.manifest.name}, {model.variant} on {model.runtime.provider}), "
        f"{args.duration:.0f} s per point, load from {args.client}\n"
    )
    print(
        f"ceiling: raw ONNX Runtime in-process, length-sorted batches of {best_size}, {best_threads} "
        f"intra-op threads (the best of {rates} texts/s): {statistics.median(ceilings.values()):.0f} "
        f"texts/s, median of the interleaved measurements; one request's texts as one batch: {latencies} "
        f"ms by texts per request\n"
    )
    for shape in shapes:
        print(f"\n{shape} texts per request\n")
        print(
            "| concurrency | ceiling texts/s | service texts/s | x ceiling | p50 ms | p99 ms | mean batch "
            "| server cores | off texts/s | on/off |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for concurrency in concurrencies:
            on, off = (
                results["batching"][str(shape)][concurrency],
                results["batching_off"][str(shape)][concurrency],
            )
            on_rate, off_rate = float(on["texts_per_s"]), float(off["texts_per_s"])  # type: ignore[arg-type]
            top = ceilings[concurrency]
            print(
                f"| {concurrency} | {top:.0f} | {on_rate:.0f} | {on_rate / top:.2f} "
                f"| {on['p50_ms']} | {on['p99_ms']} | {on['mean_batch_size']} | {on['server_cores']} "
                f"| {off_rate:.0f} | {on_rate / max(off_rate, 1e-9):.2f} |"
            )
    summary = {
        "bundle": str(args.bundle),
        "variant": model.variant,
        "provider": model.runtime.provider,
        "texts_per_request": shapes,
        "ceiling": {
            "best_batch_size": best_size,
            "best_intra_op_threads": best_threads,
            "sweep": rates,
            "interleaved": ceilings,
        },
        "ceiling_latency_ms": latencies,
        "service": results["batching"],
        "batching_off": results["batching_off"],
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
