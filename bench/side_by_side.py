"""Service vs. raw ONNX Runtime, and batching on vs. off, measured side by side in one run.

    python bench/side_by_side.py --bundle bundles/default

1. The ceiling: the same bundle, variant, provider and session options as the service, driven
   in-process (tokenise, pad, InferenceSession.run) at batch sizes 1..128; the best texts/s is the
   ceiling, and the time of one request's texts in one batch is the ceiling latency.
2. The service (`python -m service.main`, defaults) and the service with batching off
   (max_batch_size=1), both started once, measured at each concurrency in turn (interleaved, so that
   both see the same background load), with bench/loadgen.py.

Prints a Markdown table and, as its last line, the result as one JSON object. ENCODER_* variables
(e.g. ENCODER_PROVIDER=cuda) apply to the ceiling and to both services.
"""

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests")]

from loadgen import LoadResult, make_texts, run_load  # noqa: E402
from service_process import ServiceProcess  # noqa: E402

from service.batcher import pad_batch  # noqa: E402
from service.bundle_loader import LoadedModel, load_model  # noqa: E402
from service.settings import Settings  # noqa: E402

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)


def ceiling(model: LoadedModel, texts: list[str], seconds_per_size: float) -> dict[str, object]:
    """Best in-process texts/s over batch sizes. Texts are batched in length order (the least padding
    any batcher could achieve), and tokenisation is included (the service tokenises too)."""
    lengths = [len(ids) for ids in model.tokenizer.encode(texts).token_ids]
    by_length = [text for _, text in sorted(zip(lengths, texts, strict=True))]
    best_size, best_rate, rates = 0, 0.0, {}
    for size in BATCH_SIZES:
        done, position, started = 0, 0, time.perf_counter()
        while time.perf_counter() - started < seconds_per_size:
            chunk = by_length[position : position + size] or by_length[:size]
            position = (position + size) % len(by_length)
            run_texts(model, chunk, model.tokenizer.pad_id)
            done += len(chunk)
        rate = done / (time.perf_counter() - started)
        rates[str(size)] = round(rate, 1)
        if rate > best_rate:
            best_size, best_rate = size, rate
    return {"best_batch_size": best_size, "texts_per_s": round(best_rate, 1), "by_batch_size": rates}


def run_texts(model: LoadedModel, texts: list[str], pad_id: int) -> None:
    input_ids, attention_mask = pad_batch(model.tokenizer.encode(texts).token_ids, pad_id)
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
    values = {}
    for line in text.splitlines():
        if line.startswith(("encoder_batch_size_sum", "encoder_batch_size_count")):
            name, value = line.split()
            values[name] = float(value)
    return values["encoder_batch_size_sum"], values["encoder_batch_size_count"]


def measure(base_url: str, concurrency: int, texts_per_request: int, duration_s: float) -> dict[str, object]:
    asyncio.run(run_load(base_url, concurrency, texts_per_request, duration_s=min(1.0, duration_s)))  # warm
    items_before, batches_before = mean_batch_size(base_url)
    result: LoadResult = asyncio.run(
        run_load(base_url, concurrency, texts_per_request, duration_s=duration_s)
    )
    items_after, batches_after = mean_batch_size(base_url)
    batches = batches_after - batches_before
    return asdict(result) | {"mean_batch_size": round((items_after - items_before) / max(batches, 1), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=REPO_ROOT / "bundles" / "default")
    parser.add_argument("--texts-per-request", type=int, default=8)
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per measurement")
    parser.add_argument("--ceiling-seconds", type=float, default=2.0, help="seconds per batch size")
    args = parser.parse_args()
    concurrencies = [int(value) for value in args.concurrency.split(",")]

    settings = Settings(bundle=args.bundle)
    model = load_model(settings)
    texts = make_texts(4096)
    top = ceiling(model, texts, args.ceiling_seconds)
    top_latency = ceiling_latency_ms(model, texts, args.texts_per_request)
    configurations = {"batching": {}, "batching_off": {"max_batch_size": 1}}
    results: dict[str, dict[int, dict[str, object]]] = {name: {} for name in configurations}
    services = {name: ServiceProcess(args.bundle, **overrides) for name, overrides in configurations.items()}
    try:
        for service in services.values():
            service.wait_ready()
        for concurrency in concurrencies:
            for name, service in services.items():
                results[name][concurrency] = measure(
                    service.base_url, concurrency, args.texts_per_request, args.duration
                )
    finally:
        for service in services.values():
            service.stop()

    print(
        f"\nbundle {args.bundle} ({model.manifest.name}, {model.variant} on {model.runtime.provider}), "
        f"{args.texts_per_request} texts per request, {args.duration:.0f} s per point\n"
    )
    print(
        f"ceiling (raw ONNX Runtime, in-process): {top['texts_per_s']} texts/s at batch size "
        f"{top['best_batch_size']}; one request's {args.texts_per_request} texts: {top_latency} ms\n"
    )
    print(
        "| concurrency | service texts/s | x ceiling | p50 ms | p99 ms | mean batch | off texts/s | on/off |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for concurrency in concurrencies:
        on, off = results["batching"][concurrency], results["batching_off"][concurrency]
        on_rate, off_rate = float(on["texts_per_s"]), float(off["texts_per_s"])  # type: ignore[arg-type]
        of_ceiling = on_rate / float(top["texts_per_s"])
        print(
            f"| {concurrency} | {on_rate:.0f} | {of_ceiling:.2f} | {on['p50_ms']} | {on['p99_ms']} | "
            f"{on['mean_batch_size']} | {off_rate:.0f} | {on_rate / max(off_rate, 1e-9):.2f} |"
        )
    summary = {
        "bundle": str(args.bundle),
        "variant": model.variant,
        "provider": model.runtime.provider,
        "texts_per_request": args.texts_per_request,
        "ceiling": top,
        "ceiling_latency_ms": top_latency,
        "service": results["batching"],
        "batching_off": results["batching_off"],
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
