"""The `encoder` console script: one subcommand per offline step, plus `serve`.

Each package registers its own subcommands (model.cli, export.cli, service.cli). Those modules
import only argparse at import time and defer heavy imports (torch, onnxruntime) into the handler,
so `encoder --help` is instant and `encoder serve` never imports torch.

This module sits on top of every package and nothing imports it. The packages raise their own errors;
only here do they become what a user sees: every command ends by
printing one JSON object on its last stdout line, and a problem the user can fix is one line on
stderr and exit status 2, never a traceback.
"""

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

# A handler returns the command's result, printed as the last stdout line.
Handler = Callable[[argparse.Namespace], dict[str, Any]]


def build_parser() -> argparse.ArgumentParser:
    from export.cli import register as register_export
    from model.cli import register as register_model
    from service.cli import register as register_service

    parser = argparse.ArgumentParser(
        prog="encoder",
        description="Train, fine-tune, evaluate, export and serve a small Transformer encoder.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register_model(commands)
    register_export(commands)
    register_service(commands)
    return parser


def user_error_types() -> tuple[type[Exception], ...]:
    """The failures a user can fix, each with a one-line message. Imported only once a command has
    failed: the bundle and settings errors bring in pydantic, which `encoder --help` does not need."""
    from bundle import BundleError
    from export.errors import ExportError
    from model.errors import ModelError
    from service.settings import SettingsError

    return (ModelError, ExportError, BundleError, SettingsError, FileNotFoundError, PermissionError)


def emit_result(result: dict[str, Any]) -> None:
    """Print the command's result as the last stdout line, for scripts that chain the steps."""
    print(json.dumps(result, default=str), flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        result = handler(args)
    except KeyboardInterrupt:
        print(f"encoder {args.command}: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        if not isinstance(exc, user_error_types()):
            raise
        print(f"encoder {args.command}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    emit_result(result)


if __name__ == "__main__":
    main()
