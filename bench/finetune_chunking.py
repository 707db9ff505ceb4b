"""Contrastive fine-tuning step time: one padded batch against length-sorted chunks, side by side.

    .venv/bin/python bench/finetune_chunking.py --run runs/default/pretrain \
        --pairs runs/default/data/pairs_train.jsonl

Both ways compute the same loss (tests/test_model_objectives.py checks the embeddings are equal);
the chunks skip most of the padding. The two take turns step by step (forward, backward, AdamW on
the same batches), so load on the machine hits both alike. Prints one JSON object.
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch

from model.encoder import mean_pool, optimizer_groups
from model.finetune import ContrastiveTask, contrastive_loss, pooled_embeddings, read_pairs
from model.run import load_run
from model.tokenizer import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, required=True, help="any RUN (its encoder is fine-tuned)")
    parser.add_argument("--pairs", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = load_run(args.run)
    encoder = run.build_encoder().train()
    task = ContrastiveTask(
        read_pairs(args.pairs, limit=20_000),
        load_tokenizer(run.tokenizer_path),
        encoder,
        torch.device("cpu"),
        batch_size=64,
        temperature=0.05,
        seed=0,
        symmetric=True,
    )
    optimizer = torch.optim.AdamW(optimizer_groups(encoder, 0.01), lr=1e-5)

    def padded(rows: list[int]) -> torch.Tensor:
        pooled = []
        for tokens in (task.queries, task.positives):
            input_ids, attention_mask = tokens.batch(rows)
            pooled.append(mean_pool(encoder(input_ids, attention_mask), attention_mask))
        return contrastive_loss(pooled[0], pooled[1], 0.05, [], symmetric=True)

    def chunked(rows: list[int]) -> torch.Tensor:
        queries = pooled_embeddings(encoder, task.queries, rows, torch.device("cpu"))[0]
        documents = pooled_embeddings(encoder, task.positives, rows, torch.device("cpu"))[0]
        return contrastive_loss(queries, documents, 0.05, [], symmetric=True)

    seconds = {"padded": 0.0, "chunked": 0.0}
    for step in range(args.steps + 1):
        rows = list(range(step * 64, (step + 1) * 64))
        for name, loss_of in (("padded", padded), ("chunked", chunked)):
            started = time.perf_counter()
            loss_of(rows).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step > 0:  # the first step warms both up
                seconds[name] += time.perf_counter() - started
    print(
        json.dumps(
            {
                "seconds_per_step": {name: round(value / args.steps, 3) for name, value in seconds.items()},
                "speedup": round(seconds["padded"] / seconds["chunked"], 2),
                "threads": args.threads,
                "load_average_1min": os.getloadavg()[0],
            }
        )
    )


if __name__ == "__main__":
    main()
