"""The model bundle contract (docs/architecture.md, "Bundle format"): one pydantic schema shared by the
writer (export/) and the reader (service/), and the graph contract (bundle/contract.py). Importable
without torch or onnxruntime."""

from bundle.manifest import (
    FORMAT_VERSION,
    Architecture,
    BundleError,
    ClassifierSpec,
    EmbeddingSpec,
    Manifest,
    RerankerSpec,
    TeacherSpec,
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
    "RerankerSpec",
    "TeacherSpec",
    "VariantSpec",
    "file_sha256",
    "load_manifest",
    "verify_bundle",
]
