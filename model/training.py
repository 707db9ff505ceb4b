"""What pretraining and fine-tuning share: device and threads, the LR schedule, seeded batches, the
metrics log, the torchrun (DDP) process group, and the one training loop that drives every step."""

import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from model.errors import ModelError


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError("device cuda: no CUDA device is available to this PyTorch build")
    return torch.device(name)


def set_threads(threads: int | None) -> int:
    """A fixed intra-op thread count: CPU results are only reproducible for the same count. The
    default counts the CPUs this process may run on (taskset, a container's cpuset), not the host's."""
    count = threads or min(4, len(os.sched_getaffinity(0)))
    torch.set_num_threads(count)
    return count


@dataclass
class Schedule:
    """Linear warmup to the peak, then linear decay to zero (BERT; suits short budgets), over
    --max-steps, over the wall-clock budget, or over whichever of the two runs out first.

    The budget is tracked in seconds, not in steps estimated up front, because on a shared machine
    the step time drifts (Cramming, Geiping & Goldstein 2022, does the same). Only the step-sized
    schedule is reproducible run to run."""

    peak_lr: float
    max_steps: int | None
    budget_seconds: float | None
    warmup_fraction: float = 0.06

    def __post_init__(self) -> None:
        if self.max_steps is None and self.budget_seconds is None:
            raise ModelError("give max_steps or budget_seconds to size the training schedule")

    def time_fraction(self, train_seconds: float) -> float:
        return train_seconds / self.budget_seconds if self.budget_seconds else 0.0

    def done(self, step: int, time_fraction: float) -> bool:
        return (self.max_steps is not None and step >= self.max_steps) or time_fraction >= 1.0

    def progress(self, step: int, time_fraction: float) -> float:
        """The share of the schedule done before this step: by steps, by time, whichever is further."""
        steps = self.max_steps or 0
        return max(step / steps if steps else 0.0, time_fraction)

    def lr(self, step: int, time_fraction: float) -> float:
        """Progress is the larger of the step fraction and the time fraction; warmup uses the progress
        after this step, so the first step does not run at a learning rate of zero."""
        steps = self.max_steps or 0
        progress = self.progress(step, time_fraction)
        progress_after = max((step + 1) / steps if steps else 0.0, time_fraction, 1e-3)
        warmup = progress_after / self.warmup_fraction
        decay = (1 - progress) / (1 - self.warmup_fraction)
        return self.peak_lr * max(0.0, min(1.0, warmup, decay))


class MetricsLog:
    """metrics.jsonl (one JSON object per line), mirrored to TensorBoard when it is installed."""

    def __init__(self, path: Path, keep_until_step: int | None = None) -> None:
        self.path = path
        if keep_until_step is not None and path.is_file():
            # A resumed run rewrites the log from the checkpoint on, so it reads like one run.
            lines = path.read_text().splitlines()
            kept = [line for line in lines if json.loads(line)["step"] <= keep_until_step]
            path.write_text("".join(line + "\n" for line in kept))
        elif path.exists():
            path.unlink()
        self.handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.tensorboard = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(path.parent / "tensorboard"))
        except ImportError:
            pass

    def write(self, record: dict[str, Any]) -> None:
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.handle.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


@dataclass
class Distributed:
    """The process's place in a torchrun job; world_size 1 when started without torchrun."""

    rank: int
    world_size: int
    local_rank: int
    # NCCL reduces only CUDA tensors, gloo CPU ones.
    reduce_device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, device: torch.device) -> "Distributed":
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls(rank=0, world_size=1, local_rank=0)
        local_rank = int(os.environ["LOCAL_RANK"])
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        return cls(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)

    def device(self, device: torch.device) -> torch.device:
        if device.type == "cuda":
            torch.cuda.set_device(self.local_rank)
            self.reduce_device = torch.device("cuda", self.local_rank)
            return self.reduce_device
        return device

    def mean(self, value: float) -> float:
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.reduce_device)
        dist.all_reduce(tensor)
        return float(tensor.item()) / self.world_size

    def maximum(self, value: float) -> float:
        """Ranks agree on the wall-clock progress, so they stop at the same step."""
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.reduce_device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return float(tensor.item())

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world_size > 1:
            dist.destroy_process_group()


@functools.lru_cache(maxsize=2)
def _epoch_order(rows: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(rows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batch_rows(rows: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Rows of global batch `step`: epoch-wise permutations seeded by (seed, epoch), so the data order
    is a pure function of (seed, step) and a resumed run sees the batches an uninterrupted one would.
    A batch never spans two epochs (the tail rows of an epoch are skipped), so every row of a batch is
    distinct, which in-batch contrastive losses rely on."""
    per_epoch = max(1, rows // batch_size)
    epoch, position = divmod(step, per_epoch)
    order = _epoch_order(rows, seed, epoch)
    return order[position * batch_size : (position + 1) * batch_size].tolist()


def held_out_split(rows: int, at_most: int, seed: int) -> tuple[list[int], list[int]]:
    """(training rows, held-out rows), both sorted: a seeded random tenth of the rows, at most `at_most`."""
    held = min(at_most, rows // 10)
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[held:]), sorted(order[:held])


@dataclass
class StepResult:
    """What one step's loss function hands the loop: the loss to minimise, the tokens it processed
    (for throughput), and any extra scalars worth logging (the parts of a multi-task loss)."""

    loss: torch.Tensor
    tokens: int = 0
    logs: dict[str, float] = field(default_factory=dict)


@dataclass
class LoopState:
    """Where a run stands; saved in resume checkpoints, so a resumed run continues the same curve."""

    step: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    recent_losses: list[float] = field(default_factory=list)
    first_loss: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "LoopState":
        known = ("step", "tokens", "train_seconds", "recent_losses", "first_loss")
        return cls(**{key: values[key] for key in known if key in values})

    @property
    def final_loss(self) -> float | None:
        return sum(self.recent_losses) / len(self.recent_losses) if self.recent_losses else None


class TrainLoop:
    """The one loop of every training command: set the scheduled learning rate, compute the step's
    loss, backward, clip, AdamW step; log, count tokens and time, stop on the step or time budget.

    Pretraining and each fine-tune differ only in the loss function they pass (`step_loss(step)`),
    so schedule, clipping, logging and budgets behave the same everywhere."""

    def __init__(
        self,
        name: str,
        parameters: list[torch.nn.Parameter],
        optimizer: torch.optim.Optimizer,
        schedule: Schedule,
        metrics: MetricsLog | None,
        *,
        grad_clip: float = 1.0,
        distributed: Distributed | None = None,
        progress: bool = True,
        state: LoopState | None = None,
    ) -> None:
        self.name = name
        self.parameters = parameters
        self.optimizer = optimizer
        self.schedule = schedule
        self.metrics = metrics
        self.grad_clip = grad_clip
        self.distributed = distributed or Distributed(rank=0, world_size=1, local_rank=0)
        self.progress = progress
        self.state = state or LoopState()

    def time_fraction(self) -> float:
        return self.distributed.maximum(self.schedule.time_fraction(self.state.train_seconds))

    def finished(self) -> bool:
        return self.schedule.done(self.state.step, self.time_fraction())

    def run(
        self,
        step_loss: Callable[[int], StepResult],
        stop_at: float = math.inf,
        after_step: Callable[[LoopState], None] | None = None,
    ) -> LoopState:
        """Train until the schedule is done or `stop_at` steps; `after_step` runs after every step
        (pretraining saves its resume checkpoints there)."""
        state = self.state
        bar = tqdm(
            total=self.schedule.max_steps,
            initial=state.step,
            desc=self.name,
            file=sys.stderr,
            dynamic_ncols=True,
            disable=not (self.progress and self.distributed.is_main),
        )
        time_fraction = self.time_fraction()
        while not self.schedule.done(state.step, time_fraction) and state.step < stop_at:
            started = time.perf_counter()
            lr = self.schedule.lr(state.step, time_fraction)
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            result = step_loss(state.step)
            result.loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            state.step += 1
            loss = self.distributed.mean(result.loss.item())
            seconds = time.perf_counter() - started
            state.train_seconds += seconds
            tokens = result.tokens * self.distributed.world_size
            state.tokens += tokens
            state.recent_losses = [*state.recent_losses[-19:], loss]
            if state.first_loss is None:
                state.first_loss = loss
            time_fraction = self.time_fraction()
            if self.metrics is not None:
                record: dict[str, Any] = {"step": state.step, "loss": loss, "lr": lr}
                record.update(result.logs)
                record.update(grad_norm=float(grad_norm), tokens=state.tokens)
                record["tokens_per_s"] = round(tokens / max(seconds, 1e-9), 1)
                self.metrics.write(record)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
            bar.update(1)
            if after_step is not None:
                after_step(state)
        bar.close()
        return state

    def summary(self) -> dict[str, Any]:
        state = self.state
        return {
            "steps": state.step,
            "max_steps": self.schedule.max_steps,
            "finished": self.finished(),
            "first_loss": state.first_loss,
            "final_loss": state.final_loss,
            "tokens": state.tokens,
            "tokens_per_s": round(state.tokens / state.train_seconds) if state.train_seconds else None,
            "train_seconds": round(state.train_seconds, 1),
            "lr": self.schedule.peak_lr,
        }
