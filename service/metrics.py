"""Every Prometheus metric of the service (docs/architecture.md, "Metrics"), on its own registry,
created at start-up.

Labelled series that are known in advance are initialised here too, so a scrape right after
start-up already shows them (dashboards and alerts do not see "no data" before the first request).

Every per-request and per-batch metric has a `model` label: the served model's configured name, so
its values are bounded by the configuration (a request for an unknown model, or for no model at all,
is counted under `model=""`). `ModelMetrics` holds one model's series, for its batcher and pipeline.
"""

from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.metrics import MetricWrapperBase

from service.errors import ErrorType, reject_reason

# The routes that run the model; the Grafana dashboard's traffic and latency panels select these.
INFERENCE_ROUTES = (
    "/",
    "/embed",
    "/classify",
    "/predict",
    "/similarity",
    "/rerank",
    "/v1/embeddings",
    "/v1/rerank",
    "/v2/rerank",
)
# The routes that are also served for each model under /models/{name} (service/middleware.py).
MODEL_ROUTES = (*INFERENCE_ROUTES, "/tokenize", "/decode", "/info")
ROUTES = (
    *MODEL_ROUTES,
    "/health",
    "/ready",
    "/metrics",
    "/v1/models",
    "/admin/reload",
)
NO_MODEL = ""  # the model label of requests that no served model answered
RELOAD_OUTCOMES = ("reloaded", "unchanged", "refused")
OTHER_ROUTE = "other"  # unknown paths share one label value, so scanners cannot explode cardinality
REJECT_REASONS = tuple(error_type.reject_reason for error_type in ErrorType if error_type.reject_reason)

# The *_created series double every counter and histogram for a timestamp nobody queries.
disable_created_metrics()

# Latency buckets from 0.5 ms (a tiny batch on a GPU) to 30 s (the default request deadline).
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKEN_BUCKETS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass(frozen=True)
class ModelMetrics:
    """One model's series of the per-batch and per-request metrics (the label already applied)."""

    queue_items: Gauge
    queue_tokens: Gauge
    queue_wait: Histogram
    inference_duration: Histogram
    batch_size: Histogram
    batch_tokens: Histogram
    batch_padding_ratio: Histogram
    tokenize_duration: Histogram
    input_tokens: Counter
    truncated_inputs: Counter


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = Counter(
            "encoder_requests",
            "HTTP requests by route and status code",
            ["route", "status", "model"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "encoder_request_duration_seconds",
            "Time from request received to response sent",
            ["route", "model"],
            buckets=SECONDS_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "encoder_queue_wait_seconds",
            "Time an item waited in the queue before its batch ran",
            ["model"],
            buckets=SECONDS_BUCKETS,
            registry=registry,
        )
        self.tokenize_duration = Histogram(
            "encoder_tokenize_duration_seconds",
            "Time to tokenise one request",
            ["model"],
            buckets=SECONDS_BUCKETS,
            registry=registry,
        )
        self.inference_duration = Histogram(
            "encoder_inference_duration_seconds",
            "Time of one InferenceSession.run over a batch",
            ["model"],
            buckets=SECONDS_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "encoder_batch_size", "Items per batch", ["model"], buckets=SIZE_BUCKETS, registry=registry
        )
        self.batch_tokens = Histogram(
            "encoder_batch_tokens",
            "Padded tokens per batch",
            ["model"],
            buckets=TOKEN_BUCKETS,
            registry=registry,
        )
        self.batch_padding_ratio = Histogram(
            "encoder_batch_padding_ratio",
            "Fraction of a batch's padded tokens that are padding",
            ["model"],
            buckets=RATIO_BUCKETS,
            registry=registry,
        )
        self.queue_items = Gauge(
            "encoder_queue_items", "Items waiting in the queue", ["model"], registry=registry
        )
        self.queue_tokens = Gauge(
            "encoder_queue_tokens", "Tokens of the items waiting in the queue", ["model"], registry=registry
        )
        self.input_tokens = Counter(
            "encoder_input_tokens", "Tokens of served inputs after truncation", ["model"], registry=registry
        )
        self.truncated_inputs = Counter(
            "encoder_truncated_inputs",
            "Inputs truncated to max_seq_len tokens",
            ["model"],
            registry=registry,
        )
        self.rejected = Counter(
            "encoder_rejected",
            "Requests refused or failed, by reason",
            ["reason", "model"],
            registry=registry,
        )
        self.model_info = Gauge(
            "encoder_model_info",
            "A loaded model version (during a reload, the old and the new one); always 1",
            ["model", "name", "version", "variant", "provider"],
            registry=registry,
        )
        self.model_resident_bytes = Gauge(
            "encoder_model_resident_bytes",
            "Resident memory that loading and warming up a model version added to the process",
            ["model", "version"],
            registry=registry,
        )
        self.reloads = Counter(
            "encoder_model_reloads",
            "Reload attempts (SIGHUP or POST /admin/reload) by model and outcome",
            ["model", "outcome"],
            registry=registry,
        )
        self.models: dict[str, ModelMetrics] = {}
        # Requests refused before any model is known (a slow or malformed request) are counted here.
        for reason in REJECT_REASONS:
            self.rejected.labels(reason=reason, model=NO_MODEL)

    def add_model(self, model: str) -> ModelMetrics:
        """Register a configured model's label value, with its series initialised; returns its series."""
        if model in self.models:
            return self.models[model]
        for route in ROUTES:
            self.request_duration.labels(route=route, model=model)
            self.requests.labels(route=route, status="200", model=model)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason=reason, model=model)
        for outcome in RELOAD_OUTCOMES:
            self.reloads.labels(model=model, outcome=outcome)
        series: list[MetricWrapperBase] = [
            metric.labels(model=model)
            for metric in (
                self.queue_items,
                self.queue_tokens,
                self.queue_wait,
                self.inference_duration,
                self.batch_size,
                self.batch_tokens,
                self.batch_padding_ratio,
                self.tokenize_duration,
                self.input_tokens,
                self.truncated_inputs,
            )
        ]
        self.models[model] = ModelMetrics(*series)  # type: ignore[arg-type]
        return self.models[model]

    def observe_response(self, path: str, status: int, seconds: float, model: str | None = None) -> None:
        """Count one answered request: by route, status and model, its duration, and its rejection reason."""
        route = path if path in ROUTES else OTHER_ROUTE
        model = model if model in self.models else NO_MODEL  # never a label value a client chose
        self.requests.labels(route=route, status=str(status), model=model).inc()
        self.request_duration.labels(route=route, model=model).observe(seconds)
        if (reason := reject_reason(status)) is not None:
            self.rejected.labels(reason=reason, model=model).inc()

    def model_loaded(
        self, model: str, name: str, version: str, variant: str, provider: str, resident: int
    ) -> None:
        labels = {"model": model, "name": name, "version": version, "variant": variant, "provider": provider}
        self.model_info.labels(**labels).set(1)
        self.model_resident_bytes.labels(model=model, version=version).set(resident)

    def model_released(self, model: str, name: str, version: str, variant: str, provider: str) -> None:
        self.model_info.remove(model, name, version, variant, provider)
        self.model_resident_bytes.remove(model, version)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
