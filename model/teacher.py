"""The teacher of `encoder distill`: any bundle, run through the project's ONNX Runtime session
(bundle/runtime.py) in length-sorted batches, with its outputs on a corpus cached on disk.

The cache is a directory per (teacher, variant, texts) under the cache root:

    <cache root>/<key>/
      meta.json        teacher name and sha256, variant, rows, dim, labels: what the key stands for
      embedding.npy    (rows, dim) float32, memory-mapped, in corpus order
      logits.npy       (rows, labels) float32, only for a teacher with a classifier
      progress.json    {"batches_done": k}: the first k length-sorted batches are written

Batches are written into the memory-mapped arrays and progress.json is replaced after them, so an
interrupted pass resumes at the first batch not recorded, and a finished cache is only read (the
arrays are opened read-only and paged in as training indexes them; the corpus never needs to fit in
memory twice).
"""

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.format import open_memmap
from tokenizers import Tokenizer
from tqdm import tqdm

from bundle.contract import TOKENIZER_FILE, pad_to_longest
from bundle.manifest import MANIFEST_FILE, Manifest, file_sha256, verify_bundle
from bundle.runtime import OnnxRuntime
from model.errors import ModelError

TEACHER_BATCH = 64
# The progress file is rewritten (and the arrays flushed) every this many batches, and at the end.
FLUSH_EVERY_BATCHES = 32
PAD_TOKENS = ("[PAD]", "<pad>")


@dataclass(frozen=True)
class TeacherOutputs:
    embeddings: np.ndarray  # (N, dim) float32: pooled, not normalised (the bundle's `embedding`)
    logits: np.ndarray | None  # (N, labels) float32, or None without a classifier


@dataclass(frozen=True)
class CacheReport:
    path: Path
    computed_rows: int  # rows the teacher ran on in this call
    reused_rows: int  # rows found already written by an earlier (possibly interrupted) call


class Teacher:
    """A verified bundle and one ONNX Runtime session over the chosen variant."""

    def __init__(
        self, bundle_dir: Path, variant: str = "fp32", provider: str = "auto", threads: int = 0
    ) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.manifest: Manifest = verify_bundle(self.bundle_dir)
        if variant not in self.manifest.variants:
            raise ModelError(
                f"{self.bundle_dir}: the teacher has no {variant} variant "
                f"(it has {sorted(self.manifest.variants)})"
            )
        self.variant = variant
        self.sha256 = file_sha256(self.bundle_dir / MANIFEST_FILE)
        self.runtime = OnnxRuntime(self.bundle_dir / self.manifest.variants[variant].file, provider, threads)
        self.tokenizer = Tokenizer.from_file(str(self.bundle_dir / TOKENIZER_FILE))
        # Each batch is padded to its own longest text, as the service does.
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.manifest.max_seq_len)
        pad_ids = [self.tokenizer.token_to_id(token) for token in PAD_TOKENS]
        self.pad_id = next((token_id for token_id in pad_ids if token_id is not None), 0)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def dim(self) -> int:
        return self.manifest.embedding.dim

    @property
    def labels(self) -> list[str] | None:
        return list(self.manifest.classifier.labels) if self.manifest.classifier else None

    def _batches(self, texts: list[str]) -> tuple[list[list[int]], list[list[int]]]:
        """Token ids of every text and the length-sorted batches (index lists) to run them in."""
        ids = [encoding.ids for encoding in self.tokenizer.encode_batch(texts)]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        return ids, [order[start : start + TEACHER_BATCH] for start in range(0, len(order), TEACHER_BATCH)]

    def _run_batch(self, ids: list[list[int]], indices: list[int]) -> tuple[np.ndarray, np.ndarray | None]:
        input_ids, attention_mask = pad_to_longest([ids[i] for i in indices], self.pad_id)
        outputs = self.runtime.run(input_ids, attention_mask)
        return outputs.embeddings, outputs.logits

    def outputs(self, texts: list[str], desc: str = "teacher") -> TeacherOutputs:
        """The teacher's outputs on `texts`, in input order, held in memory (evaluation sets)."""
        ids, batches = self._batches(texts)
        embeddings = np.zeros((len(texts), self.dim), dtype=np.float32)
        logits = np.zeros((len(texts), len(self.labels)), dtype=np.float32) if self.labels else None
        for indices in tqdm(batches, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=False):
            batch_embeddings, batch_logits = self._run_batch(ids, indices)
            embeddings[indices] = batch_embeddings
            if logits is not None and batch_logits is not None:
                logits[indices] = batch_logits
        return TeacherOutputs(embeddings, logits)

    def cached_outputs(self, texts: list[str], cache_root: Path, progress: bool = True) -> CacheReport:
        """Fill (or resume, or reuse) the cache of the teacher's outputs on `texts`; read it back with
        open_cache(report.path)."""
        path = cache_path(cache_root, self.sha256, self.variant, texts)
        meta = {
            "teacher": self.name,
            "teacher_sha256": self.sha256,
            "variant": self.variant,
            "rows": len(texts),
            "dim": self.dim,
            "labels": self.labels,
            "batch": TEACHER_BATCH,
        }
        ids, batches = self._batches(texts)
        done = _batches_done(path) if _read_json(path / "meta.json") == meta else 0
        mode = "r+" if done else "w+"
        if not done:
            path.mkdir(parents=True, exist_ok=True)
            (path / "progress.json").unlink(missing_ok=True)
            (path / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        embeddings = open_memmap(path / "embedding.npy", mode, np.float32, (len(texts), self.dim))
        logits = None
        if self.labels:
            logits = open_memmap(path / "logits.npy", mode, np.float32, (len(texts), len(self.labels)))
        reused = sum(len(indices) for indices in batches[:done])
        bar = tqdm(
            total=len(batches),
            initial=done,
            desc="teacher",
            file=sys.stderr,
            dynamic_ncols=True,
            disable=not progress,
        )
        for number in range(done, len(batches)):
            indices = batches[number]
            batch_embeddings, batch_logits = self._run_batch(ids, indices)
            embeddings[indices] = batch_embeddings
            if logits is not None and batch_logits is not None:
                logits[indices] = batch_logits
            bar.update(1)
            if (number + 1) % FLUSH_EVERY_BATCHES == 0 or number + 1 == len(batches):
                embeddings.flush()
                if logits is not None:
                    logits.flush()
                _write_progress(path, number + 1)
        bar.close()
        return CacheReport(path=path, computed_rows=len(texts) - reused, reused_rows=reused)


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "encoder" / "teacher"


def cache_path(cache_root: Path, teacher_sha256: str, variant: str, texts: list[str]) -> Path:
    """The cache directory of one teacher variant's outputs on exactly these texts, in this order."""
    digest = hashlib.sha256(f"{teacher_sha256}\n{variant}\n".encode())
    for text in texts:
        digest.update(text.encode("utf-8", errors="surrogatepass") + b"\n")
    return Path(cache_root) / digest.hexdigest()[:24]


def open_cache(path: Path) -> TeacherOutputs:
    """A finished cache, memory-mapped read-only."""
    meta = _read_json(path / "meta.json")
    if meta is None:
        raise ModelError(f"{path}: not a teacher cache (meta.json missing or unreadable)")
    batches = -(-int(meta["rows"]) // int(meta["batch"]))
    if _batches_done(path) != batches:
        raise ModelError(f"{path}: the teacher cache is incomplete; run distill again to finish it")
    embeddings = np.load(path / "embedding.npy", mmap_mode="r")
    logits = np.load(path / "logits.npy", mmap_mode="r") if meta["labels"] else None
    return TeacherOutputs(embeddings, logits)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _batches_done(path: Path) -> int:
    progress = _read_json(path / "progress.json") or {}
    done = progress.get("batches_done", 0)
    return done if isinstance(done, int) else 0


def _write_progress(path: Path, batches_done: int) -> None:
    # Write then rename: a pass killed mid-write never leaves a progress file that claims too much.
    partial = path / "progress.json.partial"
    partial.write_text(json.dumps({"batches_done": batches_done}) + "\n")
    partial.replace(path / "progress.json")
