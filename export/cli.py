"""`encoder export` and `encoder import-hf`. Only argparse at import time; torch/onnx load in the handlers.

Each handler returns the command's result; a problem the user can fix is an ExportError (or a
ModelError for the RUN being exported), which the `encoder` CLI prints as one line.
"""

import argparse
from pathlib import Path
from typing import Any

from export.errors import ExportError

DEFAULT_VARIANTS = "fp32,int8"


def register(subparsers: Any) -> None:
    export = subparsers.add_parser(
        "export",
        help="export a RUN to an ONNX model bundle (parity-checked fp32, int8, fp16)",
        description="Export a trained RUN directory to a model bundle. Every variant must pass its parity "
        "gate; if one fails, nothing is written at --out.",
    )
    export.add_argument(
        "--model", required=True, type=Path, help="RUN directory (pretrain, embed or classify)"
    )
    export.add_argument("--name", help="model name in the manifest (default: the RUN directory's name)")
    _add_bundle_arguments(export)
    export.set_defaults(handler=run_export)

    import_hf = subparsers.add_parser(
        "import-hf",
        help="import a local Hugging Face BERT-family or sentence-transformers checkpoint as a bundle",
        description="Import a local Hugging Face BERT-family checkpoint into the bundle format. A "
        "sentence-transformers folder's pooling and Normalize modules are honoured. Needs the 'hf' extra.",
    )
    import_hf.add_argument("--model", required=True, type=Path, help="local checkpoint directory")
    import_hf.add_argument("--name", help="model name in the manifest (default: the directory's name)")
    import_hf.add_argument(
        "--pooling",
        choices=["auto", "mean", "cls"],
        default="auto",
        help="auto: from 1_Pooling/config.json, else mean",
    )
    import_hf.add_argument(
        "--normalize",
        choices=["auto", "true", "false"],
        default="auto",
        help="whether /embed normalises by default; auto: true (a Normalize module or a plain "
        "checkpoint used for cosine similarity)",
    )
    import_hf.add_argument(
        "--max-seq-len", type=int, help="truncation length (default: the checkpoint's own)"
    )
    _add_bundle_arguments(import_hf)
    import_hf.set_defaults(handler=run_import_hf)


def _add_bundle_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="bundle directory to write")
    parser.add_argument(
        "--variants",
        default=DEFAULT_VARIANTS,
        help=f"comma-separated subset of fp32,int8,fp16 (default {DEFAULT_VARIANTS}); fp32 is required",
    )
    parser.add_argument("--version", default="1", help="model version in the manifest")
    parser.add_argument(
        "--eval", type=Path, help="JSON lines ({text,label} or {query,positive}) for the task-metric gate"
    )
    parser.add_argument(
        "--fuse",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="store ONNX Runtime's fused fp32 graph (attention, skip-layer-norm, GELU...), parity-checked, "
        "and quantise it for int8 (default; --no-fuse stores and quantises the plain exported graph)",
    )
    parser.add_argument("--fp32-max-abs-diff", type=float, default=1e-4)
    parser.add_argument("--int8-min-cosine", type=float, default=0.97)
    parser.add_argument("--fp16-min-cosine", type=float, default=0.999)
    parser.add_argument(
        "--max-metric-drop",
        type=float,
        default=0.02,
        help="largest accuracy / recall@1 drop vs PyTorch on --eval",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    parser.add_argument(
        "--prompt",
        action="append",
        default=[],
        metavar="NAME=TEXT",
        help="a named prompt that requests can ask for with prompt_name (TEXT goes before each text); "
        "repeatable; import-hf also takes the folder's sentence-transformers prompts",
    )
    parser.add_argument(
        "--default-prompt-name", metavar="NAME", help="the prompt applied when a request names none"
    )


def _options(args: argparse.Namespace) -> "Any":
    from export.bundle_writer import ExportOptions
    from export.parity import EvalData, ParityThresholds

    return ExportOptions(
        variants=[name.strip() for name in args.variants.split(",") if name.strip()],
        version=args.version,
        fuse=args.fuse,
        eval_data=EvalData.read(args.eval) if args.eval else None,
        thresholds=ParityThresholds(
            fp32_max_abs_diff=args.fp32_max_abs_diff,
            int8_min_cosine=args.int8_min_cosine,
            fp16_min_cosine=args.fp16_min_cosine,
            max_metric_drop=args.max_metric_drop,
        ),
        force=args.force,
    )


def _refuse_to_overwrite(args: argparse.Namespace) -> None:
    # Before the model loads, so that the user learns it at once; write_bundle checks again.
    if args.out.exists() and not args.force:
        raise ExportError(f"{args.out} already exists (pass --force to replace it)")


def _prompt_flags(args: argparse.Namespace) -> dict[str, str]:
    # Parsed before the model loads, so that a typo is reported at once.
    prompts = {}
    for flag in args.prompt:
        name, equals, text = flag.partition("=")
        if not equals or not name:
            raise ExportError(f"--prompt {flag!r}: expected NAME=TEXT")
        prompts[name] = text
    return prompts


def _with_prompts(source: "Any", prompts: dict[str, str], default_name: str | None) -> "Any":
    """The source with the prompts of the flags added to its own (import-hf: the folder's)."""
    import dataclasses

    from bundle.manifest import EmbeddingSpec

    prompts = source.embedding.prompts | prompts
    default_name = default_name or source.embedding.default_prompt_name
    if default_name is not None and default_name not in prompts:
        raise ExportError(
            f"--default-prompt-name {default_name!r} is not one of the prompts {sorted(prompts)}"
        )
    embedding = EmbeddingSpec(
        **source.embedding.model_dump() | {"prompts": prompts, "default_prompt_name": default_name}
    )
    return dataclasses.replace(source, embedding=embedding)


def _write(source: "Any", args: argparse.Namespace, prompts: dict[str, str]) -> dict[str, Any]:
    from tqdm import tqdm

    from export.bundle_writer import write_bundle

    source = _with_prompts(source, prompts, args.default_prompt_name)
    options = _options(args)
    # One progress() call per step: export, fp32 parity, fusion, task metric, each reduced variant.
    steps = 2 + bool(options.fuse) + bool(options.eval_data) + len(options.variants) - 1
    with tqdm(total=steps, unit="step", desc="export") as bar:

        def progress(step: str) -> None:
            bar.set_postfix_str(step)
            bar.update(1)

        manifest = write_bundle(source, args.out, options, progress)
    return {
        "bundle": str(args.out),
        "name": manifest.name,
        "variants": {name: spec.parity for name, spec in manifest.variants.items()},
        "fusions": manifest.variants["fp32"].fusions,
        "classifier": manifest.classifier.labels if manifest.classifier else None,
        "prompts": manifest.embedding.prompts,
    }


def run_export(args: argparse.Namespace) -> dict[str, Any]:
    from export.run_source import source_from_run

    _refuse_to_overwrite(args)
    prompts = _prompt_flags(args)
    return _write(source_from_run(args.model, args.name), args, prompts)


def run_import_hf(args: argparse.Namespace) -> dict[str, Any]:
    from export.hf_import import source_from_hf

    _refuse_to_overwrite(args)
    prompts = _prompt_flags(args)
    normalize = None if args.normalize == "auto" else args.normalize == "true"
    source = source_from_hf(
        args.model, name=args.name, pooling=args.pooling, normalize=normalize, max_seq_len=args.max_seq_len
    )
    return _write(source, args, prompts)
