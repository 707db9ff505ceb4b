"""What reranking costs when served: one `/rerank` request per query, each with the query's top DEPTH
passages from a first stage (an embed RUN, as `encoder eval rerank --first-stage RUN` ranks them), sent
one at a time to the service on a reranker bundle.

    python bench/rerank_latency.py --bundle bundles/reranker --first-stage runs/default/embed \
        --queries runs/default/data/retrieval_queries.jsonl \
        --corpus runs/default/data/retrieval_corpus.jsonl --limit 200

The last stdout line is the result as one JSON object: p50, p90 and p99 milliseconds per query.
"""

import argparse
import json
import time
from pathlib import Path

import httpx
from loadgen import percentile

from model.evaluate import read_retrieval_data
from model.rerank import DEFAULT_DEPTH, embedding_candidates
from service.process import ServiceProcess

WARM_UP = 10  # requests sent first and not timed: the first runs allocate buffers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True, help="reranker bundle")
    parser.add_argument("--first-stage", type=Path, required=True, help="embed RUN that picks the passages")
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--depth", type=int, default=DEFAULT_DEPTH)
    parser.add_argument("--limit", type=int, default=200, help="queries timed")
    args = parser.parse_args()
    data = read_retrieval_data(args.queries, args.corpus)
    queries = data.query_texts[: args.limit + WARM_UP]
    candidates = embedding_candidates(args.first_stage, queries, data.doc_texts, args.depth)
    bodies = [
        {"query": query, "texts": [data.doc_texts[doc] for doc in row]}
        for query, row in zip(queries, candidates, strict=True)
    ]
    service = ServiceProcess(args.bundle)
    timings: list[float] = []
    try:
        service.wait_ready()
        with httpx.Client(base_url=service.base_url, timeout=60.0) as client:
            for number, body in enumerate(bodies):
                started = time.perf_counter()
                response = client.post("/rerank", json=body)
                elapsed = time.perf_counter() - started
                response.raise_for_status()
                if number >= WARM_UP:
                    timings.append(1000 * elapsed)
    finally:
        service.stop()
    timings.sort()
    result = {
        "queries": len(timings),
        "depth": args.depth,
        "p50_ms": round(percentile(timings, 0.5), 1),
        "p90_ms": round(percentile(timings, 0.9), 1),
        "p99_ms": round(percentile(timings, 0.99), 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
