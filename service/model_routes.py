"""The routes about the served models rather than through them: OpenAI's model list (so that the
`openai` client's `models.list()` and `models.retrieve()` work) and the reload that operators trigger
(`POST /admin/reload`, the same as SIGHUP but answered with each model's outcome; service/registry.py)."""

from fastapi import APIRouter
from fastapi.responses import Response

from service.errors import ErrorType, ServiceError
from service.registry import ServedVersion
from service.responses import json_response
from service.routes import OPENAI_ERRORS, TEI_ERRORS, State
from service.schemas import OpenAIModel, OpenAIModelList, ReloadResponse, ReloadResult

router = APIRouter()

OWNED_BY = "encoder"


def openai_model(served: ServedVersion) -> OpenAIModel:
    created = int(served.model.manifest.created_at.timestamp())
    return OpenAIModel(id=served.name, created=created, owned_by=OWNED_BY)


@router.get("/v1/models", response_model=OpenAIModelList, responses=OPENAI_ERRORS)
async def list_models(state: State) -> Response:
    """Every served model, the default one first, in OpenAI's shape; `id` is what `model` takes."""
    state.ready_model()
    models = [openai_model(served) for served in state.registry.versions()]
    return await json_response(OpenAIModelList(data=models).model_dump())


@router.get("/v1/models/{model}", response_model=OpenAIModel, responses=OPENAI_ERRORS)
async def retrieve_model(model: str, state: State) -> Response:
    """One served model; 404 (`model_not_found`) for a name that is not served."""
    return await json_response(openai_model(state.ready_model(model)).model_dump())


@router.post("/admin/reload", response_model=ReloadResponse, responses=TEI_ERRORS)
async def reload_models(state: State) -> Response:
    """Re-read every configured bundle directory and swap in each new version that passes
    verification and warm-up (SIGHUP does the same without an answer). Needs the API key: without
    one configured, this route is not served."""
    if state.settings.api_key is None:
        raise ServiceError(ErrorType.NOT_FOUND, "POST /admin/reload is served only when api_key is set")
    state.ready_model()
    outcomes = await state.registry.reload_all()
    results = [
        ReloadResult(
            model=outcome.model,
            outcome=outcome.outcome,
            version=outcome.version,
            previous_version=outcome.previous_version,
            error=outcome.error,
        )
        for outcome in outcomes
    ]
    return await json_response(ReloadResponse(models=results).model_dump())
