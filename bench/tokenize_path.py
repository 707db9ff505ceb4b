"""The encode pipeline's tokenisation step (service.pipeline.tokenize, run on a worker thread per
request; the prompt is prepended before it) against the tokenizer's batch call alone, and for
token-ID inputs, which skip the tokenizer.

    python bench/tokenize_path.py --bundle bundles/default --texts 1024 --rounds 30

The cases run interleaved, round after round, so that load from other jobs hits each alike; prints
median and best milliseconds per case and, as its last line, the result as one JSON object.
"""

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from bundle import load_manifest
from bundle.contract import TOKENIZER_FILE
from service.pipeline import tokenize, with_prompt
from service.tokenization import TextTokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=Path("bundles/default"))
    parser.add_argument("--texts", type=int, default=1024, help="inputs per call (a full client batch)")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()

    manifest = load_manifest(args.bundle)
    tokenizer = TextTokenizer(args.bundle / TOKENIZER_FILE, manifest.max_seq_len)
    texts = [f"a young horse, especially one under four years old ({index})" for index in range(args.texts)]
    prompted = with_prompt(list(texts), "query: ")
    token_ids = tokenizer.encode(texts).token_ids
    cases: dict[str, Callable[[], object]] = {
        "tokenizer batch call alone": lambda: tokenizer.encode(texts),
        "pipeline.tokenize, texts": lambda: tokenize(tokenizer, list(texts), "right"),
        "pipeline.tokenize, texts with a prompt": lambda: tokenize(tokenizer, prompted, "right"),
        "pipeline.tokenize, texts cut on the left": lambda: tokenize(tokenizer, list(texts), "left"),
        "pipeline.tokenize, token IDs": lambda: tokenize(tokenizer, list(token_ids), "right"),
    }
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, run in cases.items():
            started = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - started)
    result = {
        name: {"median_ms": statistics.median(values) * 1000, "best_ms": min(values) * 1000}
        for name, values in seconds.items()
    }
    print(f"| {args.texts} inputs | median ms | best ms |\n|---|---|---|")
    for name, figures in result.items():
        print(f"| {name} | {figures['median_ms']:.1f} | {figures['best_ms']:.1f} |")
    print(json.dumps({"texts": args.texts, "rounds": args.rounds, "cases": result}))


if __name__ == "__main__":
    main()
