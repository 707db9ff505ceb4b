#!/usr/bin/env bash
# GPU check, for a host with an NVIDIA GPU (the development machine has none). It
#   1. reports the GPU and the execution providers ONNX Runtime sees (CUDA must be among them);
#   2. checks parity on CUDA: each GPU variant of the bundle (fp32, fp16) run by the CUDA provider
#      against fp32 on the CPU provider, on texts of mixed lengths, padded like the service pads them;
#   3. runs the service's side-by-side benchmark with ENCODER_PROVIDER=cuda.
#
# Usage: bench/gpu_check.sh [BUNDLE [FLAG...]]   BUNDLE defaults to bundles/default (`make model`);
#        FLAGs go to bench/side_by_side.py, e.g. --concurrency 1,32,128,512 --texts-per-request 32
# The venv needs onnxruntime-gpu instead of onnxruntime (both provide the same module):
#   .venv/bin/pip uninstall -y onnxruntime && .venv/bin/pip install -e '.[gpu]'
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
bundle=${1:-bundles/default}
shift $(( $# > 0 ? 1 : 0 ))

step() { printf '\n== %s\n' "$*"; }

[ -f "$bundle/manifest.json" ] || { echo "no bundle at $bundle: run \`make model\` or pass a bundle directory" >&2; exit 2; }

step "GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi not available"

step "ONNX Runtime providers"
"$python" - <<'PY'
import sys

import onnxruntime

providers = onnxruntime.get_available_providers()
print(f"onnxruntime {onnxruntime.__version__}, device {onnxruntime.get_device()}: {', '.join(providers)}")
if "CUDAExecutionProvider" not in providers:
    sys.exit("CUDAExecutionProvider is missing: install onnxruntime-gpu (see the top of this script)")
PY

step "Parity on CUDA against fp32 on CPU ($bundle)"
"$python" - "$bundle" <<'PY'
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime
from tokenizers import Tokenizer

# Minimum cosine similarity of each embedding to the CPU fp32 one; fp16 loses ~3 decimal digits.
MIN_COSINE = {"fp32": 0.9999, "fp16": 0.999}

bundle = Path(sys.argv[1])
manifest = json.loads((bundle / "manifest.json").read_text())
tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
tokenizer.enable_truncation(manifest["max_seq_len"])
tokenizer.enable_padding()
texts = ["a", "the quick brown fox jumps over the lazy dog", "word " * 40, "long text " * 1000]
encodings = tokenizer.encode_batch(texts)
feeds = {
    "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
    "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
}


def embed(file: str, provider: str) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(bundle / file), providers=[provider])
    if session.get_providers()[0] != provider:  # ORT falls back to CPU silently when CUDA fails to load
        sys.exit(f"{file}: {provider} could not be used (got {session.get_providers()})")
    return session.run(["embedding"], feeds)[0].astype(np.float32)


reference = embed(manifest["variants"]["fp32"]["file"], "CPUExecutionProvider")
failed = False
for variant, min_cosine in MIN_COSINE.items():
    if variant not in manifest["variants"]:
        print(f"{variant}: not in the bundle")
        continue
    on_cuda = embed(manifest["variants"][variant]["file"], "CUDAExecutionProvider")
    cosine = (on_cuda * reference).sum(1) / (np.linalg.norm(on_cuda, axis=1) * np.linalg.norm(reference, axis=1))
    result = {"max_abs_diff": float(np.abs(on_cuda - reference).max()), "min_cosine": float(cosine.min())}
    passed = result["min_cosine"] >= min_cosine
    failed |= not passed
    print(f"{variant} on CUDA: {json.dumps(result)} {'ok' if passed else f'FAIL (min_cosine < {min_cosine})'}")
sys.exit(1 if failed else 0)
PY

step "Side-by-side benchmark on CUDA"
ENCODER_PROVIDER=cuda "$python" bench/side_by_side.py --bundle "$bundle" "$@"
