"""The `encoder` console script: one subcommand per offline step, plus `serve`.

Each package registers its own subcommands (model.cli, export.cli, service.cli). Those modules
import only argparse at import time and defer heavy imports (torch, onnxruntime) into the handler,
so `encoder --help` is instant and `encoder serve` never imports torch.

Contract (DESIGN.md §8): every command ends by printing one JSON object on its last stdout line;
a user error is one line on stderr and a non-zero exit, never a traceback.
"""

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any


class CommandError(Exception):
    """A problem the user can fix (missing file, bad flag value, empty corpus...): printed as one line."""


def emit_result(result: dict[str, Any]) -> None:
    """Print the command's result as the last stdout line, for scripts that chain the steps."""
    print(json.dumps(result, default=str), flush=True)


Handler = Callable[[argparse.Namespace], None]


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


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        handler(args)
    except CommandError as exc:
        print(f"encoder {args.command}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"encoder {args.command}: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        # Known library failures (a bundle that fails its checks, a corrupt file) are user errors too.
        from bundle import BundleError

        if isinstance(exc, BundleError | FileNotFoundError | PermissionError):
            print(f"encoder {args.command}: error: {exc}", file=sys.stderr)
            sys.exit(2)
        raise


if __name__ == "__main__":
    # Re-import so that CommandError is the class the packages raise, not a __main__ copy.
    from encoder_cli import main as encoder_main

    encoder_main()
