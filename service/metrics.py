"""Every Prometheus metric of the service (docs/architecture.md, "Metrics"), on its own registry,
created at start-up.

Labelled series that are known in advance are initialised here too, so a scrape right after
start-up already shows them (dashboards and alerts do not see "no data" before the first request).
"""

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

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
)
ROUTES = (*INFERENCE_ROUTES, "/tokenize", "/decode", "/health", "/ready", "/info", "/metrics")
OTHER_ROUTE = "other"  # unknown paths share one label value, so scanners cannot explode cardinality
REJECT_REASONS = tuple(error_type.reject_reason for error_type in ErrorType if error_type.reject_reason)

# The *_created series double every counter and histogram for a timestamp nobody queries.
disable_created_metrics()

# Latency buckets from 0.5 ms (a tiny batch on a GPU) to 30 s (the default request deadline).
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKEN_BUCKETS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = Counter(
            "encoder_requests",
            "HTTP requests by route and status code",
            ["route", "status"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "encoder_request_duration_seconds",
            "Time from request received to response sent",
            ["route"],
            buckets=SECONDS_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "encoder_queue_wait_seconds",
            "Time an item waited in the queue before its batch ran",
            buckets=SECONDS_BUCKETS,
            registry=registry,
        )
        self.tokenize_duration = Histogram(
            "encoder_tokenize_duration_seconds",
            "Time to tokenise one request",
            buckets=SECONDS_BUCKETS,
            registry=registry,
        )
        self.inference_duration = Histogram(
            "encoder_inference_duration_seconds",
            "Time of one InferenceSession.run over a batch",
            buckets=SECONDS_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "encoder_batch_size", "Items per batch", buckets=SIZE_BUCKETS, registry=registry
        )
        self.batch_tokens = Histogram(
            "encoder_batch_tokens", "Padded tokens per batch", buckets=TOKEN_BUCKETS, registry=registry
        )
        self.batch_padding_ratio = Histogram(
            "encoder_batch_padding_ratio",
            "Fraction of a batch's padded tokens that are padding",
            buckets=RATIO_BUCKETS,
            registry=registry,
        )
        self.queue_items = Gauge("encoder_queue_items", "Items waiting in the queue", registry=registry)
        self.queue_tokens = Gauge(
            "encoder_queue_tokens", "Tokens of the items waiting in the queue", registry=registry
        )
        self.input_tokens = Counter(
            "encoder_input_tokens", "Tokens of served inputs after truncation", registry=registry
        )
        self.truncated_inputs = Counter(
            "encoder_truncated_inputs", "Inputs truncated to max_seq_len tokens", registry=registry
        )
        self.rejected = Counter(
            "encoder_rejected", "Requests refused or failed, by reason", ["reason"], registry=registry
        )
        self.model_info = Gauge(
            "encoder_model_info",
            "The served model; always 1",
            ["name", "version", "variant", "provider"],
            registry=registry,
        )
        for route in ROUTES:
            self.request_duration.labels(route=route)
            self.requests.labels(route=route, status="200")
        for reason in REJECT_REASONS:
            self.rejected.labels(reason=reason)

    def observe_response(self, path: str, status: int, seconds: float) -> None:
        """Count one answered request: by route and status, its duration, and its rejection reason."""
        route = path if path in ROUTES else OTHER_ROUTE
        self.requests.labels(route=route, status=str(status)).inc()
        self.request_duration.labels(route=route).observe(seconds)
        if (reason := reject_reason(status)) is not None:
            self.rejected.labels(reason=reason).inc()

    def set_model(self, name: str, version: str, variant: str, provider: str) -> None:
        self.model_info.labels(name=name, version=version, variant=variant, provider=provider).set(1)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
