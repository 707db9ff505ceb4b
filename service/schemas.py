"""Request and response models: TEI's shapes for its routes (text-embeddings-inference 1.9), OpenAI's
for /v1/embeddings, Cohere's (and Jina's) for /v1/rerank. An input is a text or, as TEI and OpenAI
accept, a list of token IDs (used as given: the IDs of /tokenize, special tokens included). Checks
that need the model (token IDs within the vocabulary, `dimensions`, prompt names) are the pipeline's
(service/pipeline.py)."""

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    RootModel,
    WithJsonSchema,
)
from pydantic_core import PydanticCustomError

TokenIds = list[int]
Input = str | TokenIds


def is_token_ids(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, int) for item in value)


def as_list(inputs: Input | list[Input]) -> list[Input]:
    """One input (a text, or one list of token IDs) or a batch, as a batch."""
    return [inputs] if isinstance(inputs, str) or is_token_ids(inputs) else inputs  # type: ignore[list-item]


NON_EMPTY_TEXT_SCHEMA = {"type": "string", "minLength": 1}

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


def _input_problem(item: Input) -> str | None:
    """What is wrong with one input, as the end of "input 3 ...", or None."""
    if isinstance(item, str):
        if not item:
            return "is an empty string"
        problem = _unicode_problem(item)
        return None if problem is None else f"is not valid Unicode text: {problem}"
    if not item:
        return "is an empty list of token IDs"
    if any(token_id < 0 for token_id in item):
        return "has a negative token ID"
    return None


def _check_batch(batch: list[Input]) -> None:
    for index, item in enumerate(batch):
        if (problem := _input_problem(item)) is not None:
            raise ValueError(f"input {index} {problem}")


def _valid_inputs(inputs: Input | list[Input]) -> Input | list[Input]:
    # One check with one clear message, instead of pydantic's per-branch errors for the union.
    if isinstance(inputs, list) and not inputs:
        raise ValueError("the list of inputs is empty")
    _check_batch(as_list(inputs))
    return inputs


def _non_empty_text(text: str) -> str:
    if not text:
        raise ValueError("empty string")
    return _valid_text(text)


def _not_an_empty_list(value: Any) -> Any:
    # Put on a whole union (a text or a list), not its list branch: pydantic would report each branch.
    if isinstance(value, list) and not value:
        raise ValueError("the list is empty")
    return value


Text = Annotated[str, AfterValidator(_valid_text)]
NonEmptyText = Annotated[str, AfterValidator(_non_empty_text), WithJsonSchema(NON_EMPTY_TEXT_SCHEMA)]


JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}


def _json_type(value: object) -> str:
    return JSON_TYPES.get(type(value), "null")


def _is_ids(value: object) -> bool:
    return isinstance(value, list) and all(type(item) is int for item in value)


def _input_shape(value: object) -> object:
    """Says what was expected when the JSON types are wrong, instead of one error per union member."""
    if isinstance(value, str) or _is_ids(value):
        return value
    if not isinstance(value, list):
        raise PydanticCustomError(
            "input_type",
            "expected a string, an array of token IDs, or an array of those, got {got}",
            {"got": _json_type(value)},
        )
    for index, item in enumerate(value):
        if not (isinstance(item, str) or _is_ids(item)):
            raise PydanticCustomError(
                "input_type",
                "input {index}: expected a string or an array of token IDs (integers), got {got}",
                {"index": index, "got": _json_type(item)},
            )
    return value


TOKEN_IDS_SCHEMA = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
INPUT_SCHEMA = {"anyOf": [NON_EMPTY_TEXT_SCHEMA, TOKEN_IDS_SCHEMA]}
Inputs = Annotated[
    str | TokenIds | list[str | TokenIds],
    BeforeValidator(_input_shape),
    AfterValidator(_valid_inputs),
    WithJsonSchema(
        {
            "anyOf": [INPUT_SCHEMA, {"type": "array", "items": INPUT_SCHEMA, "minItems": 1}],
            "description": "a text, a list of token IDs, or a batch of either",
        }
    ),
]


def _null_means(default: bool) -> BeforeValidator:
    # TEI's spec makes these fields nullable: null asks for the default.
    return BeforeValidator(lambda value: default if value is None else value)


Truncate = Annotated[
    bool,
    _null_means(True),
    WithJsonSchema(
        {
            "type": ["boolean", "null"],
            "default": True,
            "description": "cut inputs to max_seq_len tokens (null: true); false: longer inputs are a 422",
        }
    ),
]
Normalize = Annotated[
    bool,
    _null_means(True),
    WithJsonSchema({"type": ["boolean", "null"], "default": True, "description": "L2-normalise"}),
]
# TEI's serde takes both spellings; the side of the input that is cut off when it is too long.
TruncationDirection = Literal["Right", "Left", "right", "left"]


def cut_side(direction: TruncationDirection) -> Literal["left", "right"]:
    return "left" if direction.lower() == "left" else "right"


class Truncation(BaseModel):
    """The fields of every request that tokenises text for the model."""

    model_config = STRICT
    truncate: Truncate = True
    truncation_direction: TruncationDirection = Field(
        "Right", description="Right keeps the start of a long input, Left its end"
    )


PROMPT_NAME_DESCRIPTION = (
    "a prompt of the model (GET /info, prompts) prepended to each text; default: the model's default prompt"
)


class EmbedRequest(Truncation):
    inputs: Inputs
    normalize: Normalize = True
    prompt_name: Text | None = Field(None, description=PROMPT_NAME_DESCRIPTION)
    dimensions: int | None = Field(None, gt=0, description="keep the first N dimensions (Matryoshka)")


class ClassifyRequest(Truncation):
    inputs: Inputs
    top_k: int | None = Field(None, gt=0, description="return only the k best labels")
    raw_scores: bool = Field(False, description="return logits instead of probabilities")


PairInputsType = str | list[str] | TokenIds | list[list[str] | TokenIds]


def pair_batch(inputs: PairInputsType) -> tuple[list[Any], bool]:
    """/predict's inputs as a batch of texts, (text, text) pairs and token ID lists, and whether the
    request was one input. A batch item of the wrong size stays a list, for the validator to name."""
    if isinstance(inputs, str) or is_token_ids(inputs):
        return [inputs], True
    if isinstance(inputs[0], str):
        return [tuple(inputs)], True
    batch: list[Any] = []
    for item in inputs:
        if is_token_ids(item) or len(item) not in (1, 2):
            batch.append(item)
        else:
            batch.append(item[0] if len(item) == 1 else (item[0], item[1]))
    return batch, False


def _valid_pair_inputs(inputs: PairInputsType) -> PairInputsType:
    if isinstance(inputs, list) and not inputs:
        raise ValueError("the list of inputs is empty")
    if isinstance(inputs, list) and isinstance(inputs[0], str) and len(inputs) != 2:
        raise ValueError("a list of texts is a pair, [text, text]; a batch is [[text], [text, text], ...]")
    for index, item in enumerate(pair_batch(inputs)[0]):
        if isinstance(item, list) and item and not is_token_ids(item):
            raise ValueError(f"input {index} has {len(item)} texts: one, or a pair of two")
        for part in [item] if isinstance(item, str | list) else item:
            if (problem := _input_problem(part)) is not None:
                raise ValueError(f"input {index} {problem}")
    return inputs


TEXTS_SCHEMA = {"type": "array", "items": NON_EMPTY_TEXT_SCHEMA, "minItems": 1, "maxItems": 2}
PairInputs = Annotated[
    PairInputsType,
    AfterValidator(_valid_pair_inputs),
    WithJsonSchema(
        {
            "anyOf": [
                NON_EMPTY_TEXT_SCHEMA,
                {"type": "array", "items": NON_EMPTY_TEXT_SCHEMA, "minItems": 2, "maxItems": 2},
                TOKEN_IDS_SCHEMA,
                {"type": "array", "items": {"anyOf": [TEXTS_SCHEMA, TOKEN_IDS_SCHEMA]}, "minItems": 1},
            ],
            "description": "a text, a pair [text, text], token IDs, or a batch of [text], [text, text] and "
            "token ID lists",
        }
    ),
]


class PredictRequest(Truncation):
    inputs: PairInputs
    raw_scores: bool = Field(False, description="return logits instead of probabilities")


class SimilarityInput(BaseModel):
    model_config = STRICT
    source_sentence: NonEmptyText
    sentences: Annotated[list[NonEmptyText], AfterValidator(_not_an_empty_list)] = Field(
        json_schema_extra={"minItems": 1}
    )


class SimilarityParameters(Truncation):
    prompt_name: Text | None = Field(None, description=PROMPT_NAME_DESCRIPTION)


class SimilarityRequest(BaseModel):
    model_config = STRICT
    inputs: SimilarityInput
    parameters: SimilarityParameters | None = None


def _valid_texts(texts: list[str]) -> list[str]:
    if not texts:
        raise ValueError("the list of texts is empty")
    for index, text in enumerate(texts):
        if (problem := _input_problem(text)) is not None:
            raise ValueError(f"text {index} {problem}")
    return texts


Passages = Annotated[
    list[str],
    AfterValidator(_valid_texts),
    WithJsonSchema({"type": "array", "items": NON_EMPTY_TEXT_SCHEMA, "minItems": 1}),
]


class RerankRequest(Truncation):
    """TEI's /rerank: the relevance of each text to the query. A long pair is cut from the text's side
    only (truncation_direction says which end of it); the query is never cut."""

    query: NonEmptyText
    texts: Passages
    raw_scores: bool = Field(False, description="return the relevance logits instead of their sigmoid")
    return_text: bool = Field(False, description="echo each text in its result")


class CohereDocument(BaseModel):
    model_config = STRICT
    text: NonEmptyText


def _document_text(document: str | CohereDocument) -> str:
    return document if isinstance(document, str) else document.text


class CohereRerankRequest(BaseModel):
    """Cohere's and Jina's /v1/rerank (what the `cohere` client's `rerank` posts). Documents are texts or
    {"text": ...} objects; max_chunks_per_doc and rank_fields are accepted and have no effect (a
    document is one text, cut to max_seq_len with the query)."""

    model_config = STRICT
    query: NonEmptyText
    documents: Annotated[list[NonEmptyText | CohereDocument], AfterValidator(_not_an_empty_list)] = Field(
        json_schema_extra={"minItems": 1}
    )
    model: Text | None = None  # echoed in the answer, so it must be renderable
    top_n: int | None = Field(None, gt=0, description="return only the n most relevant documents")
    return_documents: bool = Field(False, description="echo each document's text in its result")
    max_chunks_per_doc: int | None = None
    rank_fields: list[Text] | None = None

    def texts(self) -> list[str]:
        return [_document_text(document) for document in self.documents]


class CohereV2RerankRequest(BaseModel):
    """Cohere's v2 rerank (what `cohere.ClientV2`'s rerank posts): documents are texts. Each pair is cut
    to the model's max_seq_len from the document's side, which already bounds a document below
    Cohere's max_tokens_per_doc default; a smaller max_tokens_per_doc and priority are accepted and have
    no further effect."""

    model_config = STRICT
    query: NonEmptyText
    documents: Passages
    model: Text | None = None  # echoed in the answer, so it must be renderable
    top_n: int | None = Field(None, gt=0, description="return only the n most relevant documents")
    max_tokens_per_doc: int | None = Field(None, gt=0)
    priority: int | None = Field(None, ge=0)


class TokenizeRequest(BaseModel):
    model_config = STRICT
    # An empty text is fine here: it is the special tokens alone.
    inputs: Annotated[Text | list[Text], AfterValidator(_not_an_empty_list)] = Field(
        description="a text or a non-empty list of texts"
    )
    add_special_tokens: bool = True
    prompt_name: Text | None = Field(None, description=PROMPT_NAME_DESCRIPTION)


def _valid_ids(ids: TokenIds | list[TokenIds]) -> TokenIds | list[TokenIds]:
    if not ids:
        raise ValueError("the list of token IDs is empty")
    _check_batch([ids] if is_token_ids(ids) else ids)  # type: ignore[list-item]
    return ids


class DecodeRequest(BaseModel):
    model_config = STRICT
    ids: Annotated[
        TokenIds | list[TokenIds],
        AfterValidator(_valid_ids),
        WithJsonSchema(
            {
                "anyOf": [TOKEN_IDS_SCHEMA, {"type": "array", "items": TOKEN_IDS_SCHEMA, "minItems": 1}],
                "description": "token IDs, or a batch of lists of token IDs",
            }
        ),
    ]
    skip_special_tokens: bool = True

    def batch(self) -> list[TokenIds]:
        return [self.ids] if is_token_ids(self.ids) else self.ids  # type: ignore[list-item,return-value]


class Prediction(BaseModel):
    label: str
    score: float


class EmbedResponse(RootModel[list[list[float]]]):
    pass


class ClassifyResponse(RootModel[list[list[Prediction]]]):
    pass


class PredictResponse(RootModel[list[Prediction] | list[list[Prediction]]]):
    """One input (a text or a pair): its labels, best first; a batch: one such list per input."""


class SimilarityResponse(RootModel[list[float]]):
    """The cosine similarity of source_sentence with each of sentences, in their order."""


class Rank(BaseModel):
    index: int  # the text's position in the request
    score: float
    text: str | None = None  # only with return_text


class RerankResponse(RootModel[list[Rank]]):
    """One result per text, most relevant first."""


class CohereRerankDocument(BaseModel):
    text: str


class CohereRerankResult(BaseModel):
    index: int
    relevance_score: float
    document: CohereRerankDocument | None = None  # only with return_documents


class CohereRerankUsage(BaseModel):
    total_tokens: int


class CohereRerankResponse(BaseModel):
    id: str
    results: list[CohereRerankResult]
    model: str
    meta: dict[str, Any]  # Cohere's api_version and billed_units
    usage: CohereRerankUsage  # Jina's


class CohereV2RerankResult(BaseModel):
    index: int
    relevance_score: float


class CohereV2RerankResponse(BaseModel):
    id: str
    results: list[CohereV2RerankResult]
    model: str
    meta: dict[str, Any]  # Cohere's api_version and billed_units


class SimpleToken(BaseModel):
    id: int
    text: str  # the input's bytes start..stop, or the special token itself
    special: bool
    start: int | None  # UTF-8 byte offsets into the (prompted) input; null for a special token
    stop: int | None


class TokenizeResponse(RootModel[list[list[SimpleToken]]]):
    pass


class DecodeResponse(RootModel[list[str]]):
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
    concurrent_batches: int
    max_queue_items: int
    max_client_batch: int
    max_input_chars: int
    max_payload_bytes: int
    request_timeout_s: float


class TEIClassifierModel(BaseModel):
    id2label: dict[str, str]
    label2id: dict[str, int]


class TEIEmbeddingModel(BaseModel):
    pooling: str


class TEIClassifierType(BaseModel):
    classifier: TEIClassifierModel


class TEIEmbeddingType(BaseModel):
    embedding: TEIEmbeddingModel


class TEIRerankerType(BaseModel):
    reranker: TEIClassifierModel


class Info(BaseModel):
    # TEI's /info fields (its required ones, and the optional ones it fills), so its clients can read
    # this one; the service's own fields follow.
    model_id: str
    model_sha: str | None
    model_dtype: str
    model_type: TEIClassifierType | TEIEmbeddingType | TEIRerankerType
    served_model_name: str
    max_concurrent_requests: int = Field(description="queued inputs before a 429 (max_queue_items)")
    max_input_length: int
    max_batch_tokens: int
    max_batch_requests: int | None
    max_client_batch_size: int
    auto_truncate: bool
    tokenization_workers: int
    version: str
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
    prompts: dict[str, str]
    default_prompt_name: str | None
    batching: BatchingInfo
    service_version: str
    resident_bytes: int = Field(description="resident memory that loading this model version added")
    # At /info, every served model (the default one first), each described as above; empty elsewhere.
    models: list["Info"] = Field(default_factory=list)


class OpenAIModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int  # the bundle's creation time, Unix seconds
    owned_by: str


class OpenAIModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


class ReloadResult(BaseModel):
    model: str
    outcome: Literal["reloaded", "unchanged", "refused"]
    version: str = Field(description="the version serving after the attempt")
    previous_version: str
    error: str | None = Field(description="why a refused bundle was refused")


class ReloadResponse(BaseModel):
    models: list[ReloadResult]


class Status(BaseModel):
    status: str
