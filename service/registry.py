"""The served models (docs/architecture.md, "Life of a model"): for each configured name, the version
that takes new requests, with its own ONNX Runtime session, batcher and queue, so that one busy model
does not stall another.

A reload (SIGHUP or POST /admin/reload) re-reads a model's directory. A new version is verified,
loaded and warmed up next to the old one (service/bundle_loader.py), then swapped in by one assignment
on the event loop: requests resolve their model synchronously, so each one is served wholly by the
version it found. The old version stays up until the requests that hold a lease on it have finished,
then its batcher stops and its session is released. A bundle that fails verification or warm-up is
refused with one log line and `encoder_model_reloads_total{outcome="refused"}`; the old version keeps
serving.
"""

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from bundle import BundleError
from bundle.manifest import MANIFEST_FILE, file_sha256
from service.batcher import Batcher
from service.bundle_loader import LoadedModel, intra_op_threads_per_model, load_model
from service.errors import ErrorType, ServiceError
from service.metrics import Metrics, ModelMetrics
from service.settings import BundleSpec, Settings

logger = logging.getLogger("service.registry")

ReloadOutcomeName = Literal["reloaded", "unchanged", "refused"]


class ServedVersion:
    """One loaded version of a model and its batcher. A request takes a lease for as long as it uses
    the batcher; a retired version is released once its last lease ends."""

    def __init__(self, name: str, model: LoadedModel, batcher: Batcher, metrics: ModelMetrics) -> None:
        self.name = name  # the configured name, not the manifest's
        self.model = model
        self.batcher = batcher
        self.metrics = metrics
        self.leases = 0
        self.retired = False
        self._unleased = asyncio.Event()
        self._unleased.set()

    @property
    def version(self) -> str:
        return self.model.manifest.version

    def acquire(self) -> None:
        """Take a lease: the version is not released until every lease is given back (`release`)."""
        self.leases += 1
        self._unleased.clear()

    def release(self) -> None:
        self.leases -= 1
        if self.leases == 0:
            self._unleased.set()

    async def wait_unleased(self) -> None:
        await self._unleased.wait()


@dataclass(frozen=True)
class ReloadOutcome:
    model: str
    outcome: ReloadOutcomeName
    version: str  # the version serving after the attempt
    previous_version: str
    error: str | None = None


def load_models(settings: Settings) -> dict[str, LoadedModel]:
    """Every configured bundle, verified, loaded and warmed up, by served name, the default one first.
    Raises BundleError for the first one that cannot be served."""
    specs = settings.bundles()
    threads = intra_op_threads_per_model(settings, len(specs))
    models: dict[str, LoadedModel] = {}
    for spec in specs:
        model = load_model(settings, spec.directory, threads, len(specs))
        models[spec.name or model.manifest.name] = model
    return models


class ModelRegistry:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._directories: dict[str, Path] = {}
        self._current: dict[str, ServedVersion] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._retiring: set[ServedVersion] = set()
        self._tasks: set[asyncio.Task[object]] = set()

    @property
    def names(self) -> list[str]:
        return list(self._current)

    @property
    def default_name(self) -> str:
        return next(iter(self._current))

    @property
    def loaded(self) -> bool:
        return bool(self._current)

    def versions(self) -> list[ServedVersion]:
        """The version each model serves now, the default model first."""
        return list(self._current.values())

    def start(self, models: dict[str, LoadedModel], specs: list[BundleSpec]) -> None:
        """Serve the loaded models (load_models' result, in its order); runs on the event loop."""
        for (name, model), spec in zip(models.items(), specs, strict=True):
            self._directories[name] = spec.directory
            self._locks[name] = asyncio.Lock()
            self._current[name] = self._serve(name, model)

    def get(self, name: str | None) -> ServedVersion:
        """The version that takes new work for `name` (None: the default model); NOT_FOUND for a name
        that is not served, never another model in its place."""
        if name is None:
            return self._current[self.default_name]
        version = self._current.get(name)
        if version is None:
            raise ServiceError(
                ErrorType.NOT_FOUND,
                f"the model {name!r} does not exist; this service serves {self.names}",
                param="model",
                code="model_not_found",
            )
        return version

    def refuses(self, name: str | None, texts: list[str]) -> bool:
        """Whether model `name` (None: the default) would refuse a request of `texts` now (of at least
        one input when `texts` is empty: the body is not read yet)."""
        version = self._current.get(self.default_name if name is None else name)
        if version is None:
            return False
        if not texts:
            return version.batcher.refuses(1)
        # Most of the time even max_seq_len tokens per text fit, and the texts need not be measured.
        worst = len(texts) * version.model.tokenizer.max_seq_len
        if not version.batcher.refuses(len(texts), worst):
            return False
        return version.batcher.refuses(len(texts), version.model.tokenizer.token_bound(texts))

    @property
    def idle(self) -> bool:
        every = [*self._current.values(), *self._retiring]
        return all(version.leases == 0 and version.batcher.idle for version in every)

    def _serve(self, name: str, model: LoadedModel) -> ServedVersion:
        settings = self._settings
        metrics = self._metrics.add_model(name)
        batcher = Batcher(
            model.runtime,
            model.limits,
            settings.max_queue_items,
            settings.max_queue_tokens,
            model.tokenizer.pad_id,
            metrics,
        )
        batcher.start()
        manifest = model.manifest
        self._metrics.model_loaded(
            name, manifest.name, manifest.version, model.variant, model.runtime.provider, model.resident_bytes
        )
        return ServedVersion(name, model, batcher, metrics)

    async def reload(self, name: str) -> ReloadOutcome:
        """Re-read `name`'s directory; swap in the version found there if it differs and passes every
        check. One reload per model at a time."""
        async with self._locks[name]:
            current = self._current[name]
            directory = self._directories[name]
            threads = current.model.runtime.intra_op_threads
            try:
                # Loaded on a worker thread: the old version keeps serving on the event loop meanwhile.
                loaded = await asyncio.to_thread(self._load_if_changed, directory, threads, current.model)
            except Exception as error:  # whatever stops a new version, the old one serves on
                reason = str(error) if isinstance(error, BundleError) else f"{type(error).__name__}: {error}"
                logger.error(
                    "reload of %s refused, version %s keeps serving: %s", name, current.version, reason
                )
                refused = ReloadOutcome(name, "refused", current.version, current.version, reason)
                return self._count(refused)
            if loaded is None:
                logger.info("reload of %s: %s unchanged, version %s", name, directory, current.version)
                return self._count(ReloadOutcome(name, "unchanged", current.version, current.version))
            replacement = self._serve(name, loaded)
            self._current[name] = replacement  # the swap: requests resolved from here on get the new one
            current.retired = True
            self._retiring.add(current)
            self._keep(asyncio.get_running_loop().create_task(self._release(current)))
            logger.info(
                "reload of %s: version %s now serving (was %s)", name, replacement.version, current.version
            )
            return self._count(ReloadOutcome(name, "reloaded", replacement.version, current.version))

    def _load_if_changed(self, directory: Path, threads: int, current: LoadedModel) -> LoadedModel | None:
        if file_sha256(directory / MANIFEST_FILE) == current.manifest_sha256:
            return None  # manifest.json pins every file's checksum: the same manifest is the same model
        return load_model(self._settings, directory, threads, len(self._directories))

    def _count(self, outcome: ReloadOutcome) -> ReloadOutcome:
        self._metrics.reloads.labels(model=outcome.model, outcome=outcome.outcome).inc()
        return outcome

    async def reload_all(self) -> list[ReloadOutcome]:
        return [await self.reload(name) for name in self.names]

    def reload_in_background(self) -> None:
        """SIGHUP's handler: reload every model; the outcomes go to the log and the metrics."""
        self._keep(asyncio.get_running_loop().create_task(self.reload_all()))

    def _keep(self, task: "asyncio.Task[object]") -> None:
        # The loop holds tasks weakly: keep a reference until each one is done.
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _release(self, old: ServedVersion) -> None:
        """Stop a retired version once the requests that hold it have finished."""
        await old.wait_unleased()
        await old.batcher.stop()
        self._retiring.discard(old)
        manifest, model = old.model.manifest, old.model
        labels = (old.name, manifest.name, manifest.version, model.variant, model.runtime.provider)
        current = self._current[old.name]
        current_labels = (
            current.name,
            current.model.manifest.name,
            current.version,
            current.model.variant,
            current.model.runtime.provider,
        )
        if labels != current_labels:  # a rebuilt bundle may keep its version: its series is the new one's
            self._metrics.model_released(*labels)
        logger.info("released %s version %s", old.name, old.version)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for version in [*self._current.values(), *self._retiring]:
            await version.batcher.stop()
