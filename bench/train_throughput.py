"""Pretraining throughput (tokens/s) of a preset: forward + backward + AdamW step on packed
128-token sequences with 30% masking, as `encoder pretrain` runs them.

    .venv/bin/python bench/train_throughput.py --preset mini --batch-sizes 16,32 --steps 10 --threads 2

Prints one JSON object (tokens/s per batch size, and the 1-minute load average, because on a
shared machine the figure says as much about the neighbours as about the model).
"""

import argparse
import json
import os
import time

import torch

from model.config import preset_config
from model.data import mask_tokens
from model.encoder import MaskedLMModel, optimizer_groups


def tokens_per_second(preset: str, batch_size: int, steps: int, vocab_size: int) -> float:
    torch.manual_seed(0)
    config = preset_config(preset, vocab_size)
    model = MaskedLMModel(config)
    optimizer = torch.optim.AdamW(optimizer_groups(model, 0.01), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab_size, (batch_size, config.max_seq_len), generator=generator)
    attention_mask = torch.ones_like(ids)

    def step() -> None:
        inputs, labels = mask_tokens(ids, vocab_size, 0.3, generator)
        model(inputs, attention_mask, labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocations, first-call overheads
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return batch_size * config.max_seq_len * steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--batch-sizes", default="16,32")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=8192)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {
        f"batch_{size}": round(tokens_per_second(args.preset, int(size), args.steps, args.vocab_size))
        for size in args.batch_sizes.split(",")
    }
    print(
        json.dumps(
            {
                "preset": args.preset,
                "threads": args.threads,
                "tokens_per_s": results,
                "load_average_1min": os.getloadavg()[0],
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
