"""What the routes share: the settings, the metrics, the loaded model with its batcher, and the
lifecycle flags that /ready and the SIGTERM drain (service/server.py) read."""

from dataclasses import dataclass

from service.batcher import Batcher
from service.bundle_loader import LoadedModel
from service.errors import ErrorType, ServiceError
from service.metrics import Metrics
from service.settings import Settings


@dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics
    model: LoadedModel | None = None
    batcher: Batcher | None = None
    ready: bool = False
    draining: bool = False  # set on SIGTERM: /ready answers 503 and new work is refused
    in_flight: int = 0  # inference requests accepted and not yet answered

    @property
    def drained(self) -> bool:
        return self.in_flight == 0 and (self.batcher is None or self.batcher.idle)

    def saturated(self) -> bool:
        """Whether the queue is full, so that an inference request can be refused (429) unread."""
        return self.batcher is not None and self.batcher.saturated

    def ready_model(self) -> tuple[LoadedModel, Batcher]:
        """The model and batcher that take new work; 503 while loading or draining."""
        if self.draining:
            raise ServiceError(ErrorType.UNHEALTHY, "the service is shutting down")
        if not self.ready or self.model is None or self.batcher is None:
            raise ServiceError(ErrorType.UNHEALTHY, "the model is not loaded yet")
        return self.model, self.batcher
