"""Masked-language-model pretraining, on CPU, one GPU, or several processes under torchrun (DDP).

Every random choice is a pure function of (seed, step): the data order comes from a per-epoch
permutation and the masking from a per-step generator. A resumed run therefore reproduces the
loss curve of an uninterrupted one, and DDP ranks split one global batch instead of drawing their own.
"""

import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from model.config import PositionKind, preset_config
from model.data import mask_tokens, pack_corpus, read_text_lines
from model.encoder import MaskedLMModel, optimizer_groups
from model.errors import ModelError
from model.run import METRICS_FILE, save_run
from model.tokenizer import load_tokenizer
from model.training import (
    Distributed,
    MetricsLog,
    Schedule,
    pick_device,
    set_threads,
)

CHECKPOINT_DIR = "checkpoint"


@dataclass
class PretrainOptions:
    tokenizer: Path
    corpus: list[Path]
    preset: str
    out: Path
    budget_minutes: float | None = None
    max_steps: int | None = None
    seed: int = 0
    device: str = "auto"
    batch_size: int = 64  # sequences per optimizer step, summed over DDP ranks
    lr: float = 1e-3  # high for BERT, but stable with pre-LN, warmup and clipping on a small model
    weight_decay: float = 0.01
    mask_prob: float = 0.3  # Wettig et al. 2023: more than BERT's 15% trains faster
    grad_clip: float = 1.0
    position: PositionKind = "learned"
    # Packed sequence length (<= max_seq_len). Short packs make attention start out local: at init it
    # averages over the whole pack, so a 32-token pack gives each masked token mostly its own
    # sentence as context; on a short CPU budget this escapes the unigram plateau much sooner.
    seq_len: int | None = None
    checkpoint_every: int = 200
    stop_after_steps: int | None = None  # leave the run unfinished (resumable) after this many steps
    resume: bool = False
    compile: bool = False
    threads: int | None = None
    progress: bool = True


class Batches:
    """Global batch `step` of the packed corpus: epoch-wise permutations seeded by (seed, epoch)."""

    def __init__(self, rows: int, batch_size: int, seed: int) -> None:
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self._orders: dict[int, torch.Tensor] = {}

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(self.rows, generator=generator)}
        return self._orders[epoch]

    def indices(self, step: int) -> torch.Tensor:
        positions = range(step * self.batch_size, (step + 1) * self.batch_size)
        return torch.stack([self._order(p // self.rows)[p % self.rows] for p in positions])


def _masking_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed + 1) * 7_919_993 + step)


def _save_checkpoint(
    path: Path, model: MaskedLMModel, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    path.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(model.encoder.config.to_dict(), indent=2) + "\n")
    torch.save(optimizer.state_dict(), path / "optimizer.pt")
    # state.json last: its presence marks a complete checkpoint.
    (path / "state.json").write_text(json.dumps(state, indent=2) + "\n")


def _load_checkpoint(
    path: Path, model: MaskedLMModel, optimizer: torch.optim.Optimizer, device: torch.device
) -> dict[str, Any]:
    try:
        state = json.loads((path / "state.json").read_text())
        model.load_state_dict(load_file(str(path / "model.safetensors"), device=str(device)))
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    except (OSError, json.JSONDecodeError, SafetensorError, RuntimeError, KeyError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"{path}: corrupt or incompatible checkpoint ({reason})") from None
    return state


def pretrain(options: PretrainOptions) -> dict[str, Any]:
    started = time.perf_counter()
    threads = set_threads(options.threads)
    distributed = Distributed.from_environment(pick_device(options.device))
    device = distributed.device(pick_device(options.device))
    try:
        return _pretrain(options, distributed, device, threads, started)
    finally:
        distributed.close()


def _pretrain(
    options: PretrainOptions, distributed: Distributed, device: torch.device, threads: int, started: float
) -> dict[str, Any]:
    if options.batch_size % distributed.world_size != 0:
        ranks = distributed.world_size
        raise ModelError(f"batch size {options.batch_size} must be divisible by the {ranks} ranks")
    tokenizer = load_tokenizer(options.tokenizer)
    config = preset_config(options.preset, tokenizer.get_vocab_size(), position=options.position)
    seq_len = options.seq_len or config.max_seq_len
    if not 2 <= seq_len <= config.max_seq_len:
        raise ModelError(
            f"sequence length must be between 2 and max_seq_len ({config.max_seq_len}), not {seq_len}"
        )
    sequences = pack_corpus(tokenizer, read_text_lines(options.corpus), seq_len)
    batches = Batches(len(sequences), options.batch_size, options.seed)
    torch.manual_seed(options.seed)
    model = MaskedLMModel(config)
    model.init_bias_from_frequencies(sequences)
    model = model.to(device)
    optimizer = torch.optim.AdamW(
        optimizer_groups(model, options.weight_decay),
        lr=options.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
        fused=device.type == "cuda",
    )
    checkpoint_dir = options.out / CHECKPOINT_DIR
    options.out.mkdir(parents=True, exist_ok=True)
    resuming = options.resume and (checkpoint_dir / "state.json").is_file()
    state = _load_checkpoint(checkpoint_dir, model, optimizer, device) if resuming else {}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    train_model: torch.nn.Module = model
    if options.compile and device.type == "cuda":
        train_model = torch.compile(model)
    if distributed.world_size > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        train_model = DistributedDataParallel(train_model, device_ids=device_ids)
    rank_rows = slice(distributed.rank, None, distributed.world_size)

    def loss_at(step: int) -> tuple[torch.Tensor, int]:
        inputs, labels = mask_tokens(
            sequences[batches.indices(step)],
            config.vocab_size,
            options.mask_prob,
            _masking_generator(options.seed, step),
        )
        inputs, labels = inputs[rank_rows].to(device), labels[rank_rows].to(device)
        attention_mask = (inputs != config.pad_token_id).long()
        with autocast:
            return train_model(inputs, attention_mask, labels), int(attention_mask.sum())

    if resuming:
        budget_seconds = state["budget_train_seconds"]
    elif options.budget_minutes is not None:
        # The budget covers the whole command: data preparation so far, training, and the final save.
        budget_seconds = options.budget_minutes * 60 * 0.98 - (time.perf_counter() - started)
    else:
        budget_seconds = None
    schedule = Schedule(options.lr, options.max_steps, budget_seconds)
    start_step = state.get("step", 0)
    tokens_seen = state.get("tokens", 0)
    trained_seconds = state.get("train_seconds", 0.0)
    recent_losses: list[float] = state.get("recent_losses", [])
    metrics = None
    if distributed.is_main:
        metrics = MetricsLog(options.out / METRICS_FILE, start_step if resuming else None)
    stop_at = math.inf if options.stop_after_steps is None else start_step + options.stop_after_steps
    progress = tqdm(
        total=options.max_steps,
        initial=start_step,
        desc="pretrain",
        file=sys.stderr,
        dynamic_ncols=True,
        disable=not (options.progress and distributed.is_main),
    )
    step = start_step
    time_fraction = distributed.maximum(schedule.time_fraction(trained_seconds))
    model.train()
    while not schedule.done(step, time_fraction) and step < stop_at:
        lr = schedule.lr(step, time_fraction)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_started = time.perf_counter()
        loss, tokens = loss_at(step)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), options.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_value = distributed.mean(loss.item())
        step_seconds = time.perf_counter() - step_started
        trained_seconds += step_seconds
        time_fraction = distributed.maximum(schedule.time_fraction(trained_seconds))
        tokens_seen += tokens * distributed.world_size
        tokens_per_second = tokens * distributed.world_size / max(step_seconds, 1e-9)
        recent_losses = [*recent_losses[-19:], loss_value]
        if metrics is not None:
            metrics.write(
                {
                    "step": step,
                    "loss": loss_value,
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "tokens": tokens_seen,
                    "tokens_per_s": tokens_per_second,
                    "elapsed_s": round(time.perf_counter() - started, 3),
                }
            )
        progress.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tokens_per_second:,.0f}", lr=f"{lr:.2e}")
        progress.update(1)
        finished = schedule.done(step, time_fraction)
        if distributed.is_main and not finished and (step % options.checkpoint_every == 0 or step == stop_at):
            _save_checkpoint(
                checkpoint_dir,
                model,
                optimizer,
                {
                    "step": step,
                    "tokens": tokens_seen,
                    "train_seconds": trained_seconds,
                    "budget_train_seconds": budget_seconds,
                    "recent_losses": recent_losses,
                    "seed": options.seed,
                },
            )
    progress.close()
    distributed.barrier()
    finished = schedule.done(step, time_fraction)
    summary = {
        "kind": "pretrain",
        "preset": options.preset,
        "seed": options.seed,
        "steps": step,
        "max_steps": options.max_steps,
        "budget_minutes": options.budget_minutes,
        "finished": finished,
        "tokens": tokens_seen,
        "final_loss": sum(recent_losses) / len(recent_losses) if recent_losses else None,
        "tokens_per_s": round(tokens_seen / trained_seconds) if trained_seconds else None,
        "train_seconds": round(trained_seconds, 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "batch_size": options.batch_size,
        "world_size": distributed.world_size,
        "threads": threads,
        "device": device.type,
        "corpus_sequences": len(sequences),
        "seq_len": seq_len,
        "mask_prob": options.mask_prob,
        "lr": options.lr,
    }
    if metrics is not None:
        metrics.close()
    if distributed.is_main and finished:
        save_run(
            options.out,
            kind="pretrain",
            config=config,
            weights=model.state_dict(),
            tokenizer_path=options.tokenizer,
            summary=summary,
        )
    return {"run": str(options.out), **summary}
