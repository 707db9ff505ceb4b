"""Load a model bundle for serving: verify it (bundle.verify_bundle), pick the variant, open the session,
warm it up, and measure what it added to the process's resident memory."""

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from bundle import BundleError, Manifest, verify_bundle
from bundle.contract import LOGITS_OUTPUT, TOKENIZER_FILE
from bundle.manifest import MANIFEST_FILE, file_sha256
from bundle.runtime import OnnxRuntime, cuda_available, default_intra_op_threads
from service.settings import BatchLimits, Settings
from service.tokenization import TextTokenizer

logger = logging.getLogger("service.bundle_loader")


@dataclass(frozen=True)
class LoadedModel:
    bundle_dir: Path
    manifest: Manifest
    variant: str
    runtime: OnnxRuntime
    tokenizer: TextTokenizer
    limits: BatchLimits  # the batching settings resolved for the provider in use
    # Of manifest.json, which pins every file: a reload that finds the same one changes nothing.
    manifest_sha256: str
    resident_bytes: int  # what loading and warming up added to the process's resident memory

    @property
    def vocab_size(self) -> int:
        """Token IDs below this are valid inputs: known to the tokenizer and inside the graph's table."""
        return min(self.tokenizer.vocab_size, self.manifest.architecture.vocab_size)


def choose_variant(manifest: Manifest, requested: str, on_cuda: bool) -> str:
    if requested != "auto":
        if requested not in manifest.variants:
            raise BundleError(
                f"variant {requested} requested but the bundle has only {sorted(manifest.variants)}"
            )
        return requested
    # The export records which variant is fastest on each provider (int8 on CPU, fp16 on CUDA).
    return manifest.preferred_variant("cuda" if on_cuda else "cpu")


def resident_memory_bytes() -> int:
    """The process's resident set size now (Linux /proc; the service runs on Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def intra_op_threads_per_model(settings: Settings, model_count: int) -> int:
    """The explicit setting, or the default (one fewer than the CPUs) shared out evenly: each model
    runs its batches on its own thread, so several busy models together use the same cores as one."""
    if settings.intra_op_threads:
        return settings.intra_op_threads
    return max(1, default_intra_op_threads() // model_count)


def load_model(
    settings: Settings, bundle_dir: Path, intra_op_threads: int, model_count: int = 1
) -> LoadedModel:
    """Verify, load and warm up the bundle. Raises BundleError (one line naming the file at fault) for
    anything that must stop start-up or refuse a reload, including a graph that does not run and a
    process grown past settings.memory_budget_mb. `model_count` models share the CPUs: the default
    concurrent_batches gives each model its part of them."""
    variant, provider = settings.variant, settings.provider
    resident_before = resident_memory_bytes()
    manifest = verify_bundle(bundle_dir)
    manifest_sha256 = file_sha256(bundle_dir / MANIFEST_FILE)
    expects_cuda = provider == "cuda" or (provider == "auto" and cuda_available())
    chosen = choose_variant(manifest, variant, expects_cuda)
    runtime = OnnxRuntime(bundle_dir / manifest.variants[chosen].file, provider, intra_op_threads)
    if runtime.provider == "cpu" and expects_cuda and variant == "auto" and chosen == "fp16":
        # onnxruntime-gpu is installed but no GPU is visible: serve the CPU variant instead of fp16.
        chosen = choose_variant(manifest, variant, on_cuda=False)
        runtime = OnnxRuntime(bundle_dir / manifest.variants[chosen].file, "cpu", intra_op_threads)
    model_file = bundle_dir / manifest.variants[chosen].file
    if manifest.classifier is not None and not runtime.has_logits:
        raise BundleError(
            f"{model_file}: the manifest declares a classifier but the graph has no {LOGITS_OUTPUT!r} output"
        )
    tokenizer = TextTokenizer(bundle_dir / TOKENIZER_FILE, manifest.max_seq_len)
    limits = settings.batch_limits(runtime.provider, runtime.intra_op_threads * model_count)
    try:
        runtime.warm_up(limits.max_batch_size, manifest.max_seq_len, tokenizer.pad_id)
    except Exception as exc:  # ONNX Runtime's errors are untyped; any failure here is the graph's
        raise BundleError(f"{model_file}: the warm-up run failed ({str(exc).splitlines()[0]})") from None
    resident_after = resident_memory_bytes()
    budget_mb = settings.memory_budget_mb
    if budget_mb is not None and resident_after > budget_mb * 2**20:
        raise BundleError(
            f"{model_file}: loading it brings the process to {resident_after / 2**20:.0f} MiB resident, "
            f"over memory_budget_mb ({budget_mb})"
        )
    resident_bytes = max(0, resident_after - resident_before)
    logger.info(
        "loaded %s %s from %s (%s on %s, %d intra-op threads): %.1f MiB resident",
        manifest.name,
        manifest.version,
        bundle_dir,
        chosen,
        runtime.provider,
        runtime.intra_op_threads,
        resident_bytes / 2**20,
    )
    return LoadedModel(
        bundle_dir, manifest, chosen, runtime, tokenizer, limits, manifest_sha256, resident_bytes
    )
