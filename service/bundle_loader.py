"""Load a model bundle for serving: verify it (bundle.verify_bundle), pick the variant, open the session."""

import logging
from dataclasses import dataclass
from pathlib import Path

from bundle import BundleError, Manifest, verify_bundle
from bundle.contract import LOGITS_OUTPUT, TOKENIZER_FILE
from bundle.runtime import OnnxRuntime, cuda_available
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


def load_model(settings: Settings) -> LoadedModel:
    """Verify, load and warm up the bundle. Raises BundleError (one line naming the file at fault) for
    anything that must stop start-up, including a graph that does not run."""
    bundle_dir, variant, provider = settings.bundle, settings.variant, settings.provider
    manifest = verify_bundle(bundle_dir)
    expects_cuda = provider == "cuda" or (provider == "auto" and cuda_available())
    chosen = choose_variant(manifest, variant, expects_cuda)
    runtime = OnnxRuntime(bundle_dir / manifest.variants[chosen].file, provider, settings.intra_op_threads)
    if runtime.provider == "cpu" and expects_cuda and variant == "auto" and chosen == "fp16":
        # onnxruntime-gpu is installed but no GPU is visible: serve the CPU variant instead of fp16.
        chosen = choose_variant(manifest, variant, on_cuda=False)
        runtime = OnnxRuntime(bundle_dir / manifest.variants[chosen].file, "cpu", settings.intra_op_threads)
    model_file = bundle_dir / manifest.variants[chosen].file
    if manifest.classifier is not None and not runtime.has_logits:
        raise BundleError(
            f"{model_file}: the manifest declares a classifier but the graph has no {LOGITS_OUTPUT!r} output"
        )
    tokenizer = TextTokenizer(bundle_dir / TOKENIZER_FILE, manifest.max_seq_len)
    limits = settings.batch_limits(runtime.provider)
    try:
        runtime.warm_up(limits.max_batch_size, manifest.max_seq_len, tokenizer.pad_id)
    except Exception as exc:  # ONNX Runtime's errors are untyped; any failure here is the graph's
        raise BundleError(f"{model_file}: the warm-up run failed ({str(exc).splitlines()[0]})") from None
    logger.info("loaded %s %s (%s on %s)", manifest.name, manifest.version, chosen, runtime.provider)
    return LoadedModel(bundle_dir, manifest, chosen, runtime, tokenizer, limits)
