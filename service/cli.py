"""`encoder serve`: every ENCODER_* setting (service/settings.py) is also a flag; a flag wins over the
variable.

Only argparse is imported here; the service (FastAPI, ONNX Runtime) is imported when `serve` runs.
"""

import argparse

# (flag, type, choices, help): mirrors service.settings.Settings (a test keeps the two in step); the
# help texts live here because this module may not import pydantic.
SERVE_FLAGS: list[tuple[str, type, tuple[str, ...] | None, str]] = [
    (
        "bundle",
        str,
        None,
        "model bundle directory, or NAME=DIR; repeat it (or separate with commas) to serve several "
        "models, the first one the default (default bundles/default)",
    ),
    (
        "variant",
        str,
        ("auto", "fp32", "fp16", "int8"),
        "model file; auto: fp16 on CUDA, int8 on CPU if present",
    ),
    ("provider", str, ("auto", "cuda", "cpu"), "auto: CUDA when onnxruntime-gpu sees a GPU, else CPU"),
    ("max-batch-tokens", int, None, "padded tokens per batch (default 2048 on CPU, 16384 on CUDA)"),
    ("max-batch-size", int, None, "texts per batch (default 16 on CPU, 512 on CUDA); 1 turns batching off"),
    ("max-wait-ms", float, None, "wait for requests still being tokenised (default 0)"),
    ("max-padding", float, None, "largest share of padding in a batch (default 0.15 on CPU, 1 on CUDA)"),
    (
        "concurrent-batches",
        int,
        None,
        "batches run at once, each on its own thread (default: CPUs // intra-op threads on CPU, 1 on CUDA)",
    ),
    ("max-queue-items", int, None, "queued texts before requests get 429 (default 8192)"),
    ("max-queue-tokens", int, None, "queued tokens before requests get 429 (default 262144)"),
    ("max-client-batch", int, None, "inputs per request (default 1024)"),
    ("max-input-chars", int, None, "characters per input (default 100000)"),
    ("max-payload-bytes", int, None, "request body size (default 8 MiB)"),
    ("request-timeout-s", float, None, "deadline per request, 504 after it (default 30)"),
    ("header-timeout-s", float, None, "time to send the request headers, 408 after it (default 10)"),
    (
        "body-timeout-s",
        float,
        None,
        "time to send the request body after its headers, 408 after it (default 30)",
    ),
    ("api-key", str, None, "require 'Authorization: Bearer KEY' (default: no key)"),
    (
        "intra-op-threads",
        int,
        None,
        "ONNX Runtime intra-op threads per model (default 0: one fewer than the CPUs, shared out "
        "among the models)",
    ),
    (
        "memory-budget-mb",
        int,
        None,
        "refuse to load a model that brings the process's resident memory past this (default: no limit)",
    ),
    ("host", str, None, "address to bind (default 127.0.0.1; 0.0.0.0 in containers)"),
    ("port", int, None, "port to bind (default 8000)"),
]


# Flags that may be given several times; their values are joined with commas, as in the variable.
REPEATABLE_FLAGS = frozenset({"bundle"})


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    for flag, value_type, choices, help_text in SERVE_FLAGS:
        environment = "ENCODER_" + flag.upper().replace("-", "_")
        action = "append" if flag in REPEATABLE_FLAGS else "store"
        parser.add_argument(
            f"--{flag}",
            type=value_type,
            choices=choices,
            default=None,
            action=action,
            help=f"{help_text} [{environment}]",
        )


def settings_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The flags given on the command line; the rest come from ENCODER_* variables or defaults."""
    names = [flag.replace("-", "_") for flag, *_ in SERVE_FLAGS]
    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    return {name: ",".join(value) if isinstance(value, list) else value for name, value in given.items()}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a model bundle over HTTP (TEI- and OpenAI-compatible), with dynamic batching",
        description="Serve a model bundle. Every flag can also be set as an ENCODER_* environment variable.",
    )
    add_serve_arguments(parser)
    parser.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> dict[str, object]:
    from service.server import serve
    from service.settings import settings_from

    return serve(settings_from(settings_overrides(args)))
