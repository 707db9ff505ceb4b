"""Pretraining from scratch, on CPU, one GPU, or several processes under torchrun (DDP).

Two objectives: masked-language modelling (BERT, the default) and replaced-token detection (ELECTRA,
model/electra.py: a learning signal at every token, but on a CPU budget of a few hundred steps its
discriminator never leaves chance while MLM already pays; see BENCHMARKS.md).

Every random choice is a pure function of (seed, step): the data order comes from a per-epoch
permutation and the masking from a per-step generator. A resumed run therefore reproduces the loss
curve of an uninterrupted one, and DDP ranks split one global batch instead of drawing their own.
"""

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel

from model.config import PositionKind, preset_config
from model.data import mask_tokens, pack_corpus, read_text_lines
from model.electra import ReplacedTokenDetectionModel, choose_positions
from model.encoder import MaskedLMModel, optimizer_groups
from model.errors import ModelError
from model.run import METRICS_FILE, save_run
from model.tokenizer import load_tokenizer
from model.training import (
    Distributed,
    LoopState,
    MetricsLog,
    Schedule,
    StepResult,
    TrainLoop,
    batch_rows,
    pick_device,
    set_threads,
)

Objective = Literal["electra", "mlm"]
PretrainModel = MaskedLMModel | ReplacedTokenDetectionModel

CHECKPOINT_DIR = "checkpoint"
# MLM: Wettig et al. 2023, more than BERT's 15% trains faster. ELECTRA: the paper's 15%; the
# generator then has enough context to make plausible, hard-to-detect replacements.
DEFAULT_MASK_PROB: dict[str, float] = {"mlm": 0.3, "electra": 0.15}


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
    objective: Objective = "mlm"
    mask_prob: float | None = None  # default per objective: DEFAULT_MASK_PROB
    grad_clip: float = 1.0
    position: PositionKind = "learned"
    # Sequence-length schedule (BERT's): most steps on short packs of seq_len tokens, the last
    # long_fraction of them on packs of the full max_seq_len, with the same tokens per step. Short
    # packs make attention start out local (at init it averages over the whole pack, so a 64-token
    # pack gives each masked token mostly its own sentence as context) and cost less attention; the
    # long phase trains the positions a short pack never reaches, which long documents use.
    seq_len: int = 64
    long_fraction: float = 0.1
    checkpoint_every: int = 200
    stop_after_steps: int | None = None  # leave the run unfinished (resumable) after this many steps
    resume: bool = False
    compile: bool = False
    threads: int | None = None
    progress: bool = True


def _masking_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed + 1) * 7_919_993 + step)


def _save_checkpoint(
    path: Path, model: PretrainModel, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    path.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(model.encoder.config.to_dict(), indent=2) + "\n")
    torch.save(optimizer.state_dict(), path / "optimizer.pt")
    # state.json last: its presence marks a complete checkpoint.
    (path / "state.json").write_text(json.dumps(state, indent=2) + "\n")


def _load_checkpoint(
    path: Path, model: PretrainModel, optimizer: torch.optim.Optimizer, device: torch.device
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


def build_pretrain_model(config: Any, objective: Objective) -> PretrainModel:
    if objective == "electra":
        return ReplacedTokenDetectionModel(config)
    if objective == "mlm":
        return MaskedLMModel(config)
    raise ModelError(f"unknown pretraining objective {objective!r} (choose electra or mlm)")


def _pretrain(
    options: PretrainOptions, distributed: Distributed, device: torch.device, threads: int, started: float
) -> dict[str, Any]:
    if options.batch_size % distributed.world_size != 0:
        ranks = distributed.world_size
        raise ModelError(f"batch size {options.batch_size} must be divisible by the {ranks} ranks")
    tokenizer = load_tokenizer(options.tokenizer)
    config = preset_config(options.preset, tokenizer.get_vocab_size(), position=options.position)
    seq_len = min(options.seq_len, config.max_seq_len)
    if seq_len < 2 or not 0 <= options.long_fraction <= 1:
        raise ModelError(f"sequence length must be at least 2 (not {seq_len}), long fraction within 0-1")
    long_batch = max(distributed.world_size, options.batch_size * seq_len // config.max_seq_len)
    long_batch -= long_batch % distributed.world_size
    mask_prob = options.mask_prob if options.mask_prob is not None else DEFAULT_MASK_PROB[options.objective]
    lines = read_text_lines(options.corpus)
    sequences = pack_corpus(tokenizer, lines, seq_len)
    long_sequences = sequences
    if seq_len < config.max_seq_len:
        long_sequences = pack_corpus(tokenizer, lines, config.max_seq_len)
    torch.manual_seed(options.seed)
    model = build_pretrain_model(config, options.objective)
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
    saved = _load_checkpoint(checkpoint_dir, model, optimizer, device) if resuming else {}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    train_model: torch.nn.Module = model
    if options.compile and device.type == "cuda":
        train_model = torch.compile(model)
    if distributed.world_size > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        train_model = DistributedDataParallel(train_model, device_ids=device_ids)
    rank_rows = slice(distributed.rank, None, distributed.world_size)

    def step_loss(step: int) -> StepResult:
        progress = loop.schedule.progress(step, loop.schedule.time_fraction(loop.state.train_seconds))
        if progress >= 1 - options.long_fraction:
            rows = long_sequences[batch_rows(len(long_sequences), long_batch, options.seed, step)]
        else:
            rows = sequences[batch_rows(len(sequences), options.batch_size, options.seed, step)]
        generator = _masking_generator(options.seed, step)
        if options.objective == "mlm":
            inputs, labels = mask_tokens(rows, config.vocab_size, mask_prob, generator)
            inputs, labels = inputs[rank_rows].to(device), labels[rank_rows].to(device)
            attention_mask = (inputs != config.pad_token_id).long()
            with autocast:
                loss = train_model(inputs, attention_mask, labels)
            return StepResult(loss, int(attention_mask.sum()), {"seq_len": rows.shape[1]})
        chosen = choose_positions(rows, mask_prob, generator)
        inputs, chosen = rows[rank_rows].to(device), chosen[rank_rows].to(device)
        attention_mask = (inputs != config.pad_token_id).long()
        with autocast:
            loss, logs = train_model(inputs, attention_mask, chosen, generator)
        return StepResult(loss, int(attention_mask.sum()), {**logs, "seq_len": rows.shape[1]})

    if resuming:
        budget_seconds = saved["budget_train_seconds"]
    elif options.budget_minutes is not None:
        # The budget covers the whole command: data preparation so far, training, and the final save.
        budget_seconds = options.budget_minutes * 60 * 0.98 - (time.perf_counter() - started)
    else:
        budget_seconds = None
    schedule = Schedule(options.lr, options.max_steps, budget_seconds)
    state = LoopState.from_dict(saved) if resuming else LoopState()
    metrics = None
    if distributed.is_main:
        metrics = MetricsLog(options.out / METRICS_FILE, state.step if resuming else None)
    loop = TrainLoop(
        "pretrain",
        list(model.parameters()),
        optimizer,
        schedule,
        metrics,
        grad_clip=options.grad_clip,
        distributed=distributed,
        progress=options.progress,
        state=state,
    )
    stop_at = math.inf if options.stop_after_steps is None else state.step + options.stop_after_steps

    def checkpoint(state: LoopState) -> None:
        finished = loop.finished()  # a collective under DDP: every rank must ask, not only the main one
        if not distributed.is_main or finished:
            return
        if state.step % options.checkpoint_every == 0 or state.step == stop_at:
            saved_state = {**state.to_dict(), "budget_train_seconds": budget_seconds, "seed": options.seed}
            _save_checkpoint(checkpoint_dir, model, optimizer, saved_state)

    model.train()
    loop.run(step_loss, stop_at=stop_at, after_step=checkpoint)
    distributed.barrier()
    summary = {
        "kind": "pretrain",
        "objective": options.objective,
        "preset": options.preset,
        "seed": options.seed,
        **loop.summary(),
        "budget_minutes": options.budget_minutes,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "batch_size": options.batch_size,
        "world_size": distributed.world_size,
        "threads": threads,
        "device": device.type,
        "corpus_sequences": len(sequences),
        "seq_len": seq_len,
        "long_fraction": options.long_fraction,
        "mask_prob": mask_prob,
    }
    if metrics is not None:
        metrics.close()
    if distributed.is_main and summary["finished"]:
        save_run(
            options.out,
            kind="pretrain",
            config=config,
            weights=model.state_dict(),
            tokenizer_path=options.tokenizer,
            summary=summary,
        )
    return {"run": str(options.out), **summary}
