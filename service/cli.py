"""`encoder serve`: every ENCODER_* setting (DESIGN.md §7) is also a flag; a flag wins over the variable.

Only argparse is imported here; the service (FastAPI, ONNX Runtime) is imported when `serve` runs.
"""

import argparse

# (flag, type, choices): mirrors service.settings.Settings, which a test keeps in step with this table.
SERVE_FLAGS: list[tuple[str, type, tuple[str, ...] | None]] = [
    ("bundle", str, None),
    ("variant", str, ("auto", "fp32", "fp16", "int8")),
    ("provider", str, ("auto", "cuda", "cpu")),
    ("max-batch-tokens", int, None),
    ("max-batch-size", int, None),
    ("max-wait-ms", float, None),
    ("max-queue-items", int, None),
    ("max-client-batch", int, None),
    ("max-input-chars", int, None),
    ("max-payload-bytes", int, None),
    ("request-timeout-s", float, None),
    ("api-key", str, None),
    ("intra-op-threads", int, None),
    ("host", str, None),
    ("port", int, None),
]


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    for flag, value_type, choices in SERVE_FLAGS:
        environment = "ENCODER_" + flag.upper().replace("-", "_")
        parser.add_argument(
            f"--{flag}", type=value_type, choices=choices, default=None, help=f"(env {environment})"
        )


def settings_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The flags given on the command line; the rest come from ENCODER_* variables or defaults."""
    names = [flag.replace("-", "_") for flag, _, _ in SERVE_FLAGS]
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a model bundle over HTTP (TEI- and OpenAI-compatible), with dynamic batching",
        description="Serve a model bundle. Every flag can also be set as an ENCODER_* environment variable.",
    )
    add_serve_arguments(parser)
    parser.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> None:
    from encoder_cli import CommandError, emit_result
    from service.main import serve, settings_from

    try:
        settings = settings_from(settings_overrides(args))
    except ValueError as exc:
        raise CommandError(str(exc).replace("\n", " ")) from None
    emit_result(serve(settings))
