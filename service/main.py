"""Start the service: verify and load the bundle before binding the port, run uvicorn, drain on SIGTERM.

`encoder serve` and `python -m service.main` both end up in `serve`. This module imports the whole
serving stack and never torch (tests/test_service_no_torch.py checks it in a fresh interpreter).
"""

import argparse
import logging
import signal
import sys
from types import FrameType

import uvicorn
from pydantic import ValidationError

from bundle import BundleError
from encoder_cli import emit_result
from service.app import ServiceState, create_app
from service.bundle_loader import load_model
from service.cli import add_serve_arguments, settings_overrides
from service.settings import Settings

logger = logging.getLogger("service.main")

# Seconds uvicorn waits for open connections after the drain, beyond the request deadline.
SHUTDOWN_GRACE_S = 5.0


class DrainingServer(uvicorn.Server):
    """uvicorn, except that the first SIGTERM drains: /ready turns 503 and new work gets 503 while the
    requests already accepted finish; only then does the server close its sockets, and it exits 0."""

    def __init__(self, config: uvicorn.Config, state: ServiceState) -> None:
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and not self.state.draining:
            logger.info("SIGTERM: draining %d requests in flight", self.state.in_flight)
            self.state.draining = True
            return
        super().handle_exit(sig, frame)  # SIGINT, or a second SIGTERM: uvicorn's own shutdown

    async def on_tick(self, counter: int) -> bool:
        if self.state.draining and self.state.drained:
            self.should_exit = True
        return await super().on_tick(counter)


def settings_from(overrides: dict[str, object]) -> Settings:
    """Settings from ENCODER_* variables with command-line overrides; ValueError with one line if invalid."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "settings"
        raise ValueError(f"invalid setting {where}: {first['msg']}") from None


def serve(settings: Settings) -> dict[str, object]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Verified and loaded before the port is bound: a bad bundle never gets as far as accepting traffic.
    model = load_model(settings)
    app = create_app(settings, model)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        access_log=False,  # one log line per request costs more than a small batch; /metrics counts them
        timeout_graceful_shutdown=int(settings.request_timeout_s + SHUTDOWN_GRACE_S),
    )
    server = DrainingServer(config, app.state.service)
    server.run()
    return {"bundle": str(settings.bundle), "variant": model.variant, "provider": model.runtime.provider}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m service.main", description="Serve a model bundle.")
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    try:
        settings = settings_from(settings_overrides(args))
        result = serve(settings)
    except (BundleError, ValueError) as exc:  # ValueError: an invalid setting, from settings_from
        print(f"encoder serve: error: {exc}", file=sys.stderr)
        sys.exit(2)
    emit_result(result)


if __name__ == "__main__":
    main()
