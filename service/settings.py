"""Service settings (docs/architecture.md, "Settings"): `ENCODER_*` environment variables, each also a
flag of `encoder serve` (service/cli.py holds the flags and their help texts; a test keeps the two in
step)."""

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class BatchLimits(BaseModel):
    max_batch_tokens: int = Field(gt=0)  # padded tokens (batch size x longest item) per batch
    max_batch_size: int = Field(gt=0)  # items per batch
    max_wait_ms: float = Field(ge=0)  # how long a batch may wait for requests still being tokenised
    # Largest share of a batch's padded tokens that may be padding. On a CPU a padded token costs as
    # much as a real one and a batch saves little, so items join only batches of similar length.
    max_padding: float = Field(1.0, gt=0, le=1)
    # Batches in ONNX Runtime at once, each on its own thread with intra_op_threads threads.
    concurrent_batches: int = Field(1, gt=0)

    @property
    def budget(self) -> tuple[int, int, float]:
        return self.max_batch_tokens, self.max_batch_size, self.max_padding


# Measured on 2 shared CPU cores with the default bundle (bench/batching_sweep.py, BENCHMARKS.md): on a
# CPU a padded token costs as much as a real one and a bigger batch adds little, so batches are small
# (16 items, 2048 padded tokens = 16 items of max_seq_len 128) and made of items of similar length (at
# most 15% padding); 64 items or 8192 tokens were 10-20% slower, no padding limit 4% slower.
CPU_BATCH_LIMITS = BatchLimits(max_batch_tokens=2048, max_batch_size=16, max_wait_ms=0.0, max_padding=0.15)
# On a GPU a bigger batch costs almost nothing extra, so the budget is TEI's default token budget and
# padding is not limited. Not measured here (no GPU on the development machine).
CUDA_BATCH_LIMITS = BatchLimits(max_batch_tokens=16384, max_batch_size=512, max_wait_ms=0.0, max_padding=1.0)


# A model's name is a path segment (/models/{name}/embed) and a metric label value.
MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class BundleSpec(BaseModel):
    """One served model: the name it is served under (None: the manifest's name) and its directory,
    which a reload reads again."""

    name: str | None
    directory: Path


def parse_bundles(value: str) -> list[BundleSpec]:
    """`DIR`, or `NAME=DIR` entries separated by commas (the flag may also be repeated, which joins
    them); the first one is the default model. Raises ValueError naming the entry at fault."""
    specs: list[BundleSpec] = []
    for entry in (part.strip() for part in value.split(",")):
        if not entry:
            raise ValueError(f"empty entry in {value!r}")
        name, equals, directory = entry.partition("=")
        if not equals:
            specs.append(BundleSpec(name=None, directory=Path(entry)))
            continue
        if not MODEL_NAME_PATTERN.match(name):
            raise ValueError(f"model name {name!r} must be letters, digits, '.', '_' or '-' (at most 64)")
        if not directory:
            raise ValueError(f"no directory for model {name!r}")
        specs.append(BundleSpec(name=name, directory=Path(directory)))
    if len(specs) > 1 and any(spec.name is None for spec in specs):
        raise ValueError("with several bundles, each needs a name: NAME=DIR")
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"a model name is given twice in {value!r}")
    return specs


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ENCODER_", extra="ignore")

    # `DIR` or `NAME=DIR,NAME2=DIR2` (parse_bundles); the first model is the default one.
    bundle: str = "bundles/default"
    variant: Literal["auto", "fp32", "fp16", "int8"] = "auto"
    provider: Literal["auto", "cuda", "cpu"] = "auto"
    # None: the provider's default (CPU_BATCH_LIMITS or CUDA_BATCH_LIMITS).
    max_batch_tokens: int | None = Field(None, gt=0)
    max_batch_size: int | None = Field(None, gt=0)
    max_wait_ms: float | None = Field(None, ge=0)
    max_padding: float | None = Field(None, gt=0, le=1)
    # None: on a CPU, as many as the intra-op threads fit in the CPUs (at least 1); 1 on a GPU.
    concurrent_batches: int | None = Field(None, gt=0)
    # A few seconds of work for the default model on 2 CPU cores (well under the deadline): beyond that a
    # client is better served by a 429 and a retry, possibly on another replica, than by a long wait.
    max_queue_items: int = Field(8192, gt=0)
    # The same bound in tokens (as tokenised, before padding), so that 8192 long texts do not count as
    # little as 8192 short ones: 262144 is 8192 texts of 32 tokens, 2048 of 128.
    max_queue_tokens: int = Field(262_144, gt=0)
    # TEI-like limits that a client will not trip by accident.
    max_client_batch: int = Field(1024, gt=0)
    max_input_chars: int = Field(100_000, gt=0)
    max_payload_bytes: int = Field(8 * 1024 * 1024, gt=0)
    request_timeout_s: float = Field(30.0, gt=0)
    # A client that is this slow to send its request is answered 408 and disconnected, so that slow or
    # stalled senders cannot hold connections open indefinitely (service/http_protocol.py).
    header_timeout_s: float = Field(10.0, gt=0)  # from the first byte (or the connection) to the headers' end
    body_timeout_s: float = Field(30.0, gt=0)  # from the headers' end to the body's end
    api_key: str | None = None
    # 0: bundle.runtime.default_intra_op_threads() shared out among the models (intra_op_threads_per_model)
    intra_op_threads: int = Field(0, ge=0)
    # Resident memory (MiB) the process may reach by loading a model; None: no limit.
    memory_budget_mb: int | None = Field(None, gt=0)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)

    @field_validator("bundle", mode="before")
    @classmethod
    def _bundle_as_text(cls, value: object) -> object:
        return str(value) if isinstance(value, Path) else value

    @field_validator("bundle")
    @classmethod
    def _bundles_parse(cls, value: str) -> str:
        parse_bundles(value)
        return value

    def bundles(self) -> list[BundleSpec]:
        return parse_bundles(self.bundle)

    @model_validator(mode="after")
    def _queue_holds_a_client_batch(self) -> "Settings":
        if self.max_queue_items < self.max_client_batch:
            raise ValueError(
                "max_queue_items must be at least max_client_batch, or large requests always get 429"
            )
        return self

    def batch_limits(self, provider: str, threads: int) -> BatchLimits:
        """The batching limits for `provider`; by default, on a CPU, as many batches run at once as
        sessions of `threads` threads (the intra-op threads of every model served) fit in the CPUs:
        measured, two one-thread batches at once on 2 cores serve 1.4-1.7x the texts/s of one batch
        with one or two threads (BENCHMARKS.md, "One text per request")."""
        defaults = CUDA_BATCH_LIMITS if provider == "cuda" else CPU_BATCH_LIMITS
        concurrent = 1 if provider == "cuda" else max(1, len(os.sched_getaffinity(0)) // threads)
        return BatchLimits(
            max_batch_tokens=self.max_batch_tokens or defaults.max_batch_tokens,
            max_batch_size=self.max_batch_size or defaults.max_batch_size,
            max_wait_ms=defaults.max_wait_ms if self.max_wait_ms is None else self.max_wait_ms,
            max_padding=self.max_padding or defaults.max_padding,
            concurrent_batches=self.concurrent_batches or concurrent,
        )


class SettingsError(Exception):
    """An invalid setting (from an ENCODER_* variable or a flag), in one line."""


def settings_from(overrides: dict[str, object]) -> Settings:
    """Settings from ENCODER_* variables with `overrides` (the flags given) winning over them."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "settings"
        raise SettingsError(f"invalid setting {where}: {first['msg']}") from None
