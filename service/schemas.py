"""Request and response models: TEI shapes for /embed and /classify, OpenAI's for /v1/embeddings."""

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, RootModel, WithJsonSchema


def as_list(inputs: str | list[str]) -> list[str]:
    return [inputs] if isinstance(inputs, str) else inputs


# Request fields take only their own JSON type: true is not 1, "64" is not 64, "no" is not false.
STRICT = ConfigDict(strict=True)


def _unicode_problem(text: str) -> str | None:
    """Why `text` is not Unicode text, or None. A JSON escape such as "\\ud800" decodes to a lone
    surrogate, which neither the tokenizer (Rust, UTF-8 only) nor the renderer (orjson) can take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return f"lone surrogate at character {error.start}, not valid Unicode text"
    return None


def _valid_text(text: str) -> str:
    if (problem := _unicode_problem(text)) is not None:
        raise ValueError(problem)
    return text


def _valid_inputs(inputs: str | list[str]) -> str | list[str]:
    # One check with one clear message, instead of pydantic's per-branch errors for the union.
    if isinstance(inputs, list) and not inputs:
        raise ValueError("the list of inputs is empty")
    for index, text in enumerate(as_list(inputs)):
        if not text:
            raise ValueError(f"input {index} is an empty string")
        if (problem := _unicode_problem(text)) is not None:
            raise ValueError(f"input {index}: {problem}")
    return inputs


Text = Annotated[str, AfterValidator(_valid_text)]


NON_EMPTY_TEXT_SCHEMA = {"type": "string", "minLength": 1}
Inputs = Annotated[
    str | list[str],
    AfterValidator(_valid_inputs),
    WithJsonSchema(
        {"anyOf": [NON_EMPTY_TEXT_SCHEMA, {"type": "array", "items": NON_EMPTY_TEXT_SCHEMA, "minItems": 1}]}
    ),
]


class EmbedRequest(BaseModel):
    model_config = STRICT
    inputs: Inputs
    normalize: bool | None = Field(None, description="L2-normalise; default: the bundle's setting (true)")
    truncate: bool = Field(
        True, description="cut inputs to max_seq_len tokens; false: longer inputs are a 422"
    )
    dimensions: int | None = Field(None, gt=0, description="keep the first N dimensions (Matryoshka)")


class ClassifyRequest(BaseModel):
    model_config = STRICT
    inputs: Inputs
    top_k: int | None = Field(None, gt=0, description="return only the k best labels")
    raw_scores: bool = Field(False, description="return logits instead of probabilities")
    truncate: bool = True


class Prediction(BaseModel):
    label: str
    score: float


class EmbedResponse(RootModel[list[list[float]]]):
    pass


class ClassifyResponse(RootModel[list[list[Prediction]]]):
    pass


class OpenAIEmbeddingRequest(BaseModel):
    model_config = STRICT
    input: Inputs
    model: Text | None = None  # echoed in the answer, so it must be renderable
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, gt=0)
    user: Text | None = None


class OpenAIEmbedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # base64 of little-endian float32 when encoding_format is base64


class OpenAIUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class OpenAIEmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIEmbedding]
    model: str
    usage: OpenAIUsage


class TEIError(BaseModel):
    error: str
    error_type: str


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail


class BatchingInfo(BaseModel):
    max_batch_tokens: int
    max_batch_size: int
    max_wait_ms: float
    max_padding: float
    max_queue_items: int
    max_client_batch: int
    max_input_chars: int
    max_payload_bytes: int
    request_timeout_s: float


class Info(BaseModel):
    model_name: str
    model_version: str
    embedding_dim: int
    matryoshka_dims: list[int]
    normalize_default: bool
    labels: list[str]
    multi_label: bool
    max_seq_len: int
    variant: str
    provider: str
    intra_op_threads: int
    batching: BatchingInfo
    service_version: str


class Status(BaseModel):
    status: str
