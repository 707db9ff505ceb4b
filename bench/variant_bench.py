"""A bundle's variants against ONNX Runtime's best CPU recipe for the same model, side by side in one run.

    nice -n 19 .venv/bin/python bench/variant_bench.py --bundle bundles/default \\
        --texts runs/default/data/classify_test.jsonl

The reference recipe is the one ONNX Runtime documents for BERT-family encoders: its transformer
optimizer (`optimize_model`, model type bert: attention, skip-layer-norm, GELU, embed-layer-norm
fusions) on an fp32 graph, then `quantize_dynamic` with its defaults. It is built here from the
bundle's fp32 graph, or from --reference-graph (e.g. the unfused graph of an `--no-fuse` export, or
a TorchScript export of the same checkpoint, the form the optimizer's patterns were written for).

Every engine runs the same length-sorted texts (the least padding a batcher could achieve) at
batch sizes 1, 8 and 32 with the same thread count; engines take turns within each repeat so that
CPU contention from other processes hits them alike, and the best of --repeats counts. Prints a
Markdown table with each engine's ratio to the best reference engine at that batch size and, as its
last line, every figure as one JSON object.
"""

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
from export_bench import throughputs  # the sibling benchmark: the same turn-taking measurement
from tokenizers import Tokenizer

from bundle import verify_bundle
from bundle.contract import INPUT_NAMES, TOKENIZER_FILE, pad_to_longest
from export.parity import BUILTIN_TEXTS

BATCH_SIZES = (1, 8, 32)
Batches = list[tuple[np.ndarray, np.ndarray]]
Run = Callable[[np.ndarray, np.ndarray], object]


def read_texts(path: Path | None, limit: int) -> list[str]:
    if path is None:
        return (BUILTIN_TEXTS * (limit // len(BUILTIN_TEXTS) + 1))[:limit]
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:limit]
    return [row.get("text") or row["query"] for row in rows]


def length_sorted_batches(tokenizer: Tokenizer, texts: list[str], batch_size: int) -> Batches:
    sequences = sorted((encoding.ids for encoding in tokenizer.encode_batch(texts)), key=len)
    return [
        pad_to_longest(sequences[start : start + batch_size], pad_id=0)
        for start in range(0, len(sequences), batch_size)
    ]


def session_runner(path: Path, threads: int) -> Run:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda ids, mask: session.run(None, dict(zip(INPUT_NAMES, (ids, mask), strict=True)))


def build_reference(fp32_graph: Path, num_heads: int, hidden_size: int, workdir: Path) -> dict[str, Path]:
    """ONNX Runtime's recipe: transformer optimizer (bert), then dynamic int8 with its defaults."""
    from onnxruntime.quantization import quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    fused = workdir / "reference.fused.onnx"
    quantized = workdir / "reference.fused.int8.onnx"
    optimized = optimize_model(
        str(fp32_graph), model_type="bert", num_heads=num_heads, hidden_size=hidden_size
    )
    counts = {name: count for name, count in optimized.get_fused_operator_statistics().items() if count}
    print(f"reference fusions: {counts}")
    optimized.save_model_to_file(str(fused))
    quantize_dynamic(str(fused), str(quantized))
    return {"reference fused fp32": fused, "reference fused int8": quantized}


def markdown(rates: dict[int, dict[str, float]]) -> str:
    lines = ["| engine | " + " | ".join(f"batch {size}" for size in rates) + " |"]
    lines.append("|---|" + "---:|" * len(rates))
    for engine in next(iter(rates.values())):
        cells = []
        for by_engine in rates.values():
            reference = max(rate for name, rate in by_engine.items() if name.startswith("reference"))
            cells.append(f"{by_engine[engine]:.1f} ({by_engine[engine] / reference:.2f}x)")
        lines.append(f"| {engine} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True, type=Path)
    parser.add_argument("--reference-graph", type=Path, help="fp32 graph to build the reference from")
    parser.add_argument("--texts", type=Path, help="JSON lines with a text (or query) field")
    parser.add_argument("--limit", type=int, default=256, help="texts per pass")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of every engine")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--variants", default="fp32,int8", help="the bundle's variants to measure (fp16 is for GPUs)"
    )
    args = parser.parse_args()

    manifest = verify_bundle(args.bundle)
    tokenizer = Tokenizer.from_file(str(args.bundle / TOKENIZER_FILE))
    texts = read_texts(args.texts, args.limit)
    paths = {
        f"bundle {name}": args.bundle / manifest.variants[name].file
        for name in args.variants.split(",")
        if name in manifest.variants
    }
    with tempfile.TemporaryDirectory() as workdir:
        paths |= build_reference(
            args.reference_graph or args.bundle / manifest.variants["fp32"].file,
            manifest.architecture.num_heads,
            manifest.architecture.hidden_size,
            Path(workdir),
        )
        engines = {name: session_runner(path, args.threads) for name, path in paths.items()}
        rates = {
            size: throughputs(engines, length_sorted_batches(tokenizer, texts, size), args.repeats)
            for size in BATCH_SIZES
        }
    print(markdown(rates))
    result: dict[str, Any] = {
        "bundle": str(args.bundle),
        "preferred_cpu": manifest.preferred.get("cpu"),
        "texts": len(texts),
        "threads": args.threads,
        "texts_per_s": {str(size): by_engine for size, by_engine in rates.items()},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
