"""The model bundle contract (DESIGN.md §2): one pydantic schema shared by the writer (export/)
and the reader (service/). Importable without torch or onnxruntime."""

from bundle.manifest import (
    FORMAT_VERSION,
    Architecture,
    BundleError,
    ClassifierSpec,
    EmbeddingSpec,
    Manifest,
    VariantSpec,
    file_sha256,
    load_manifest,
    verify_bundle,
)

__all__ = [
    "FORMAT_VERSION",
    "Architecture",
    "BundleError",
    "ClassifierSpec",
    "EmbeddingSpec",
    "Manifest",
    "VariantSpec",
    "file_sha256",
    "load_manifest",
    "verify_bundle",
]
