"""Pretraining throughput and its share of the machine's peak, for each objective, on packed sequences
as `encoder pretrain` runs them (forward + backward + AdamW step).

    .venv/bin/python bench/train_throughput.py --preset mini --batch-size 64 --seq-len 64 --threads 2

The peak is measured, not looked up: the best of several fp32 matrix products (torch.mm, square
sizes a transformer of this width uses) on the same threads. Model FLOPs per token are counted as
PaLM's "model FLOPs utilisation" does: 6 x the parameters a token passes through (matmuls of the
blocks and the output head where it runs) plus the attention products 12 x layers x width x length;
embedding lookups cost nothing. Prints one JSON object; the 1-minute load average is in it, because
on a shared machine the figure says as much about the neighbours as about the model.
"""

import argparse
import json
import os
import time

import torch

from model.config import EncoderConfig, preset_config
from model.data import mask_tokens
from model.electra import ReplacedTokenDetectionModel, choose_positions
from model.encoder import MaskedLMModel, optimizer_groups
from model.pretrain import DEFAULT_MASK_PROB


def matmul_peak_flops(seconds: float = 3.0) -> float:
    """Best fp32 GFLOP/s of square products at sizes 256-1024 (as FLOP/s)."""
    best = 0.0
    for size in (256, 512, 1024):
        a, b = torch.randn(size, size), torch.randn(size, size)
        torch.mm(a, b)
        repeats, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds / 3:
            torch.mm(a, b)
            repeats += 1
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - started))
    return best


def flops_per_token(config: EncoderConfig, objective: str, seq_len: int, mask_prob: float) -> float:
    C, L, F, V = config.n_embd, config.n_layer, config.ffn_hidden, config.vocab_size
    block = 3 * C * C + C * C + 2 * C * F + F * C  # qkv, proj, gate+up, down
    attention = 2 * 2 * seq_len * C  # scores and weighted sum, forward, per layer
    head = C * C + C * V  # transform + tied decoder, at masked positions only
    forward = L * (block + attention)
    if objective == "mlm":
        forward += mask_prob * head
    else:  # one-block generator on every token, its head at the masked positions, detection head
        forward += block + attention + mask_prob * head + C * C + C
    return 3 * 2 * forward  # multiply-add = 2 FLOPs; backward costs twice the forward


def tokens_per_second(
    preset: str, objective: str, batch_size: int, seq_len: int, steps: int, vocab_size: int
) -> float:
    torch.manual_seed(0)
    config = preset_config(preset, vocab_size)
    model: torch.nn.Module = (
        MaskedLMModel(config) if objective == "mlm" else ReplacedTokenDetectionModel(config)
    )
    optimizer = torch.optim.AdamW(optimizer_groups(model, 0.01), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab_size, (batch_size, seq_len), generator=generator)
    attention_mask = torch.ones_like(ids)
    mask_prob = DEFAULT_MASK_PROB[objective]

    def step() -> None:
        if objective == "mlm":
            inputs, labels = mask_tokens(ids, vocab_size, mask_prob, generator)
            loss = model(inputs, attention_mask, labels)
        else:
            loss, _ = model(ids, attention_mask, choose_positions(ids, mask_prob, generator), generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocations, first-call overheads
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return batch_size * seq_len * steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--objectives", default="electra,mlm")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=8192)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peak = matmul_peak_flops()
    config = preset_config(args.preset, args.vocab_size)
    results = {}
    for objective in args.objectives.split(","):
        rate = tokens_per_second(
            args.preset, objective, args.batch_size, args.seq_len, args.steps, args.vocab_size
        )
        flops = flops_per_token(config, objective, args.seq_len, DEFAULT_MASK_PROB[objective])
        results[objective] = {
            "tokens_per_s": round(rate),
            "model_gflops_per_token": round(flops / 1e9, 4),
            "share_of_peak": round(rate * flops / peak, 3),
        }
    summary = {
        "preset": args.preset,
        "threads": args.threads,
        "batch": f"{args.batch_size}x{args.seq_len}",
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "objectives": results,
        "load_average_1min": os.getloadavg()[0],
        "torch": torch.__version__,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
