"""The ONNX Runtime session: provider choice, thread settings, IO binding on CUDA, warm-up.

It lives in bundle/, not service/, because two parts run bundles: the service, and distillation's
teacher pass (model/teacher.py). Only this module imports onnxruntime; `import bundle` does not.

The graph contract is bundle/contract.py: int64 inputs `input_ids` and `attention_mask` of shape
[batch, seq]; outputs `embedding` [batch, dim] and, with a classifier, `logits` [batch, labels].
"""

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bundle import BundleError
from bundle.contract import EMBEDDING_OUTPUT, INPUT_NAMES, LOGITS_OUTPUT

logger = logging.getLogger("bundle.runtime")

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


@dataclass(frozen=True)
class ModelOutputs:
    embeddings: np.ndarray  # (B, dim) float32
    logits: np.ndarray | None  # (B, num_labels) float32, or None without a classifier


def default_intra_op_threads() -> int:
    """One fewer than the CPUs this process may use: the event loop, HTTP, JSON and the tokenizer need a
    core of their own. Measured on 2 shared cores: 1 thread serves 31% more texts/s at concurrency 32
    than ONNX Runtime's default of one per core (BENCHMARKS.md)."""
    return max(1, len(os.sched_getaffinity(0)) - 1)


def cuda_available() -> bool:
    """Whether onnxruntime-gpu is installed; whether a GPU is visible shows when the session is made."""
    return CUDA_PROVIDER in ort.get_available_providers()


class OnnxRuntime:
    def __init__(self, model_file: Path, provider: str, intra_op_threads: int) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.intra_op_threads = intra_op_threads or default_intra_op_threads()
        options.intra_op_num_threads = self.intra_op_threads
        # One batch runs at a time (the batcher owns the session), so parallelism lives inside ops.
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        # Idle intra-op threads sleep instead of spinning: the event loop and the tokenizer share the
        # cores with them. Measured on 2 shared cores: +30% texts/s for the mini model (BENCHMARKS.md).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        wants_cuda = provider == "cuda" or (provider == "auto" and cuda_available())
        if provider == "cuda" and not cuda_available():
            raise BundleError(
                "provider cuda requested but onnxruntime-gpu is not installed (pip install .[gpu])"
            )
        providers = [CUDA_PROVIDER, CPU_PROVIDER] if wants_cuda else [CPU_PROVIDER]
        try:
            self.session = ort.InferenceSession(str(model_file), sess_options=options, providers=providers)
        except Exception as exc:  # ONNX Runtime raises its own untyped errors for corrupt graphs
            raise BundleError(
                f"{model_file}: ONNX Runtime cannot load it ({str(exc).splitlines()[0]})"
            ) from None
        # ONNX Runtime falls back to CPU when CUDA is installed but no GPU is visible; report the truth.
        self.provider = "cuda" if self.session.get_providers()[0] == CUDA_PROVIDER else "cpu"
        if provider == "cuda" and self.provider != "cuda":
            raise BundleError(f"{model_file}: provider cuda requested but ONNX Runtime sees no usable GPU")
        input_names = {node.name for node in self.session.get_inputs()}
        self.output_names = [node.name for node in self.session.get_outputs()]
        if not set(INPUT_NAMES) <= input_names or EMBEDDING_OUTPUT not in self.output_names:
            raise BundleError(
                f"{model_file}: graph must take {list(INPUT_NAMES)} and return {EMBEDDING_OUTPUT!r}, "
                f"it takes {sorted(input_names)} and returns {self.output_names}"
            )
        self.has_logits = LOGITS_OUTPUT in self.output_names

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> ModelOutputs:
        """Run one padded batch: input_ids and attention_mask are int64 (B, T)."""
        if self.provider == "cuda":
            outputs = self._run_with_io_binding(input_ids, attention_mask)
        else:
            inputs = dict(zip(INPUT_NAMES, (input_ids, attention_mask), strict=True))
            outputs = self.session.run(self.output_names, inputs)
        named = dict(zip(self.output_names, outputs, strict=True))
        # fp16 graphs return float16; everything after this point works in float32.
        logits = named.get(LOGITS_OUTPUT)
        return ModelOutputs(
            embeddings=np.asarray(named[EMBEDDING_OUTPUT], dtype=np.float32),
            logits=None if logits is None else np.asarray(logits, dtype=np.float32),
        )

    def _run_with_io_binding(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> list[np.ndarray]:
        # Inputs are copied to the GPU once and outputs allocated there by ONNX Runtime, then fetched
        # together: no per-output synchronisation and no host staging buffers on every run.
        binding = self.session.io_binding()
        for name, value in zip(INPUT_NAMES, (input_ids, attention_mask), strict=True):
            binding.bind_cpu_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, "cuda")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def warm_up(self, max_batch_size: int, max_seq_len: int, pad_id: int) -> None:
        """Run the shapes the first requests will use, so ONNX Runtime allocates and (on CUDA) tunes
        its kernels before /ready turns 200 rather than during a client's first request."""
        for batch, seq in ((1, 8), (min(max_batch_size, 8), min(max_seq_len, 64)), (1, max_seq_len)):
            ids = np.full((batch, seq), pad_id, dtype=np.int64)
            self.run(ids, np.ones((batch, seq), dtype=np.int64))
        logger.info("warm-up done on %s", self.provider)
