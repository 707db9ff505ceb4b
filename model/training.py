"""What pretraining and fine-tuning share: device and threads, the LR schedule, step planning for a
wall-clock budget, the metrics log and the torchrun (DDP) process group."""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from model.errors import ModelError


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError("device cuda: no CUDA device is available to this PyTorch build")
    return torch.device(name)


def set_threads(threads: int | None) -> int:
    """A fixed intra-op thread count: CPU results are only reproducible for the same count."""
    count = threads or min(4, os.cpu_count() or 1)
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

    def lr(self, step: int, time_fraction: float) -> float:
        """Progress is the larger of the step fraction and the time fraction; warmup uses the progress
        after this step, so the first step does not run at a learning rate of zero."""
        steps = self.max_steps or 0
        progress = max(step / steps if steps else 0.0, time_fraction)
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
