"""Run the service: verify and load the bundles before binding the port, run uvicorn, drain on SIGTERM,
reload the models' directories on SIGHUP (service/registry.py).

`encoder serve` (service/cli.py) is the one entry point. This module imports the whole serving stack
and never torch (tests/test_service_units.py checks it in a fresh interpreter).
"""

import asyncio
import logging
import signal
import socket
from types import FrameType

import uvicorn

from service.app import create_app
from service.http_protocol import service_protocol
from service.registry import load_models
from service.settings import Settings
from service.state import ServiceState

logger = logging.getLogger("service.server")

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

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # SIGHUP: re-read every model's directory and swap in what changed, while serving.
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.state.registry.reload_in_background)
        await super().startup(sockets)

    async def on_tick(self, counter: int) -> bool:
        if self.state.draining and self.state.drained:
            self.should_exit = True
        return await super().on_tick(counter)


def serve(settings: Settings) -> dict[str, object]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Until the server handles it, a SIGHUP (a reload) must not end the process, as it would by default.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Verified and loaded before the port is bound: a bad bundle never gets as far as accepting traffic.
    models = load_models(settings)
    app = create_app(settings, models)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        access_log=False,  # one log line per request costs more than a small batch; /metrics counts them
        http=service_protocol(settings.header_timeout_s, app.state.service.metrics),
        timeout_graceful_shutdown=int(settings.request_timeout_s + SHUTDOWN_GRACE_S),
    )
    server = DrainingServer(config, app.state.service)
    server.run()
    return {
        "models": {
            name: {
                "bundle": str(model.bundle_dir),
                "variant": model.variant,
                "provider": model.runtime.provider,
            }
            for name, model in models.items()
        }
    }
