"""The FastAPI application: the lifespan (load the model, run the batcher), the routes, the error
handlers and the middleware, put together. What each part does lives in its own module:
service/routes.py, service/pipeline.py, service/postprocess.py, service/error_handlers.py."""

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.bundle_loader import LoadedModel
from service.direct_routes import serve_direct, takes_direct_path
from service.error_handlers import install_error_handlers
from service.metrics import Metrics
from service.middleware import ServiceMiddleware
from service.model_routes import router as model_router
from service.registry import load_models
from service.routes import SERVICE_VERSION, router
from service.settings import Settings
from service.state import ServiceState
from service.tokenizer_routes import router as tokenizer_router

logger = logging.getLogger("service.app")


def create_app(settings: Settings, models: dict[str, LoadedModel] | None = None) -> FastAPI:
    """The app for `settings`; `models` (service.registry.load_models) are loaded here (in the lifespan)
    unless the caller already did."""
    state = ServiceState(settings=settings, metrics=Metrics())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded = models or await asyncio.to_thread(load_models, settings)
        state.registry.start(loaded, settings.bundles())
        # Everything loaded so far (libraries, models) lives as long as the process: frozen, the
        # collector's full passes no longer walk it. One such pass over the unfrozen heap held the
        # event loop for 126 ms under a flood (BENCHMARKS.md, "Fair scheduling").
        gc.collect()
        gc.freeze()
        state.ready = True
        logger.info("ready: %s", {name: model.limits for name, model in loaded.items()})
        yield
        state.ready = False
        await state.registry.stop()

    app = FastAPI(
        title="encoder-service",
        version=SERVICE_VERSION,
        description="Embeddings, classification and tokens from an ONNX model bundle, dynamically batched.",
        lifespan=lifespan,
    )
    app.state.service = state
    app.include_router(router)
    app.include_router(tokenizer_router)
    app.include_router(model_router)
    install_error_handlers(app)
    app.add_middleware(
        ServiceMiddleware,
        metrics=state.metrics,
        api_key=settings.api_key,
        max_payload_bytes=settings.max_payload_bytes,
        body_timeout_s=settings.body_timeout_s,
        refusing_model=state.refusing_model,
        takes_direct_path=takes_direct_path,
        serve_direct=serve_direct,
    )
    return app
