"""What the routes share: the settings, the metrics, the served models (service/registry.py), and the
lifecycle flags that /ready and the SIGTERM drain (service/server.py) read."""

from dataclasses import dataclass, field

from service.errors import ErrorType, ServiceError
from service.metrics import Metrics
from service.registry import ModelRegistry, ServedVersion
from service.settings import Settings


@dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics
    registry: ModelRegistry = field(init=False)
    ready: bool = False
    draining: bool = False  # set on SIGTERM: /ready answers 503 and new work is refused
    in_flight: int = 0  # inference requests accepted and not yet answered

    def __post_init__(self) -> None:
        self.registry = ModelRegistry(self.settings, self.metrics)

    @property
    def drained(self) -> bool:
        return self.in_flight == 0 and self.registry.idle

    def refusing_model(self, model: str | None, named_in_body: bool, texts: list[str]) -> str | None:
        """The name of `model` (None: the default model) if its queue cannot take the request now, so
        that an inference request for it can be refused (429) before its body is read (`texts` empty:
        one input is asked for) or validated (its `texts`, counted in inputs and in tokens, as
        admission counts them). A request that names its model in its body (OpenAI) is refused early
        only when one model is served."""
        if not self.ready or (named_in_body and len(self.registry.names) > 1):
            return None
        name = model or self.registry.default_name
        return name if self.registry.refuses(name, texts) else None

    def ready_model(self, name: str | None = None) -> ServedVersion:
        """The version of model `name` (None: the default model) that takes new work; 503 while
        loading or draining, 404 for a model that is not served."""
        if self.draining:
            raise ServiceError(ErrorType.UNHEALTHY, "the service is shutting down")
        if not self.ready or not self.registry.loaded:
            raise ServiceError(ErrorType.UNHEALTHY, "the model is not loaded yet")
        return self.registry.get(name)
