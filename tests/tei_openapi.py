"""TEI's HTTP API as its published OpenAPI document states it (text-embeddings-inference 1.9.3,
docs/openapi.json), written out here by hand for the routes this service shares with TEI: request
and response bodies as JSON Schema (OpenAPI's `nullable` as a type list). It is test data for
tests/test_tei_conformance.py, holding only what that test checks.

Where the document and TEI's code differ, the document is followed: its `truncation_direction` enum
is `Left`/`Right` (TEI's code also takes `left`/`right`), and `model_type` has exactly one key.
"""

from typing import Any

Schema = dict[str, Any]

INT32_MAX = 2**31 - 1
BOOLEAN: Schema = {"type": "boolean"}
NULLABLE_BOOLEAN: Schema = {"type": ["boolean", "null"]}
STRING: Schema = {"type": "string"}
NULLABLE_STRING: Schema = {"type": ["string", "null"]}
NUMBER: Schema = {"type": "number"}
COUNT: Schema = {"type": "integer", "minimum": 0}


def array(items: Schema, **bounds: int) -> Schema:
    return {"type": "array", "items": items, **bounds}


def obj(required: list[str], **properties: Schema) -> Schema:
    return {"type": "object", "required": required, "properties": properties}


TRUNCATION_DIRECTION: Schema = {"enum": ["Left", "Right"]}
TOKEN_IDS = array({"type": "integer", "minimum": 0, "maximum": INT32_MAX})
INPUT_TYPE: Schema = {"oneOf": [STRING, TOKEN_IDS]}
INPUT: Schema = {"oneOf": [INPUT_TYPE, array(INPUT_TYPE)]}
INPUT_IDS: Schema = {"oneOf": [TOKEN_IDS, array(TOKEN_IDS)]}
DIMENSIONS: Schema = {"type": ["integer", "null"], "minimum": 0}

EMBED_REQUEST = obj(
    ["inputs"],
    inputs=INPUT,
    dimensions=DIMENSIONS,
    normalize=BOOLEAN,
    prompt_name=NULLABLE_STRING,
    truncate=NULLABLE_BOOLEAN,
    truncation_direction=TRUNCATION_DIRECTION,
)
EMBED_RESPONSE = array(array(NUMBER))

PREDICT_INPUT: Schema = {
    "oneOf": [
        STRING,
        array(STRING, minItems=2, maxItems=2),  # a pair
        array({"oneOf": [array(STRING, minItems=1, maxItems=1), array(STRING, minItems=2, maxItems=2)]}),
    ]
}
PREDICT_REQUEST = obj(
    ["inputs"],
    inputs=PREDICT_INPUT,
    raw_scores=BOOLEAN,
    truncate=NULLABLE_BOOLEAN,
    truncation_direction=TRUNCATION_DIRECTION,
)
PREDICTION = obj(["score", "label"], label=STRING, score=NUMBER)
PREDICT_RESPONSE: Schema = {"oneOf": [array(PREDICTION), array(array(PREDICTION))]}

SIMILARITY_REQUEST = obj(
    ["inputs"],
    inputs=obj(["source_sentence", "sentences"], source_sentence=STRING, sentences=array(STRING)),
    parameters={
        "type": ["object", "null"],
        "properties": {
            "prompt_name": NULLABLE_STRING,
            "truncate": NULLABLE_BOOLEAN,
            "truncation_direction": TRUNCATION_DIRECTION,
        },
    },
)
SIMILARITY_RESPONSE = array(NUMBER)

RERANK_REQUEST = obj(
    ["query", "texts"],
    query=STRING,
    texts=array(STRING),
    raw_scores=BOOLEAN,
    return_text=BOOLEAN,
    truncate=NULLABLE_BOOLEAN,
    truncation_direction=TRUNCATION_DIRECTION,
)
RERANK_RESPONSE = array(obj(["index", "score"], index=COUNT, score=NUMBER, text=NULLABLE_STRING))

TOKENIZE_REQUEST = obj(
    ["inputs"],
    inputs={"oneOf": [STRING, array(STRING)]},
    add_special_tokens=BOOLEAN,
    prompt_name=NULLABLE_STRING,
)
SIMPLE_TOKEN = obj(
    ["id", "text", "special"],
    id=COUNT,
    text=STRING,
    special=BOOLEAN,
    start={"type": ["integer", "null"], "minimum": 0},
    stop={"type": ["integer", "null"], "minimum": 0},
)
TOKENIZE_RESPONSE = array(array(SIMPLE_TOKEN))

DECODE_REQUEST = obj(["ids"], ids=INPUT_IDS, skip_special_tokens=BOOLEAN)
DECODE_RESPONSE = array(STRING)

OPENAI_REQUEST = obj(
    ["input"],
    input=INPUT,
    model=NULLABLE_STRING,
    user=NULLABLE_STRING,
    dimensions=DIMENSIONS,
    encoding_format={"enum": ["float", "base64"]},
)
OPENAI_RESPONSE = obj(
    ["object", "data", "model", "usage"],
    object=STRING,
    model=STRING,
    data=array(
        obj(
            ["object", "embedding", "index"],
            object=STRING,
            index=COUNT,
            embedding={"oneOf": [array(NUMBER), STRING]},
        )
    ),
    usage=obj(["prompt_tokens", "total_tokens"], prompt_tokens=COUNT, total_tokens=COUNT),
)

CLASSIFIER_MODEL = obj(
    ["id2label", "label2id"],
    id2label={"type": "object", "additionalProperties": STRING},
    label2id={"type": "object", "additionalProperties": COUNT},
)
INFO = obj(
    [
        "model_id",
        "model_dtype",
        "served_model_name",
        "model_type",
        "max_concurrent_requests",
        "max_input_length",
        "max_batch_tokens",
        "max_client_batch_size",
        "auto_truncate",
        "tokenization_workers",
        "version",
    ],
    model_id=STRING,
    model_sha=NULLABLE_STRING,
    model_dtype=STRING,
    model_type={
        "oneOf": [
            obj(["classifier"], classifier=CLASSIFIER_MODEL),
            obj(["embedding"], embedding=obj(["pooling"], pooling=STRING)),
            obj(["reranker"], reranker=CLASSIFIER_MODEL),
        ]
    },
    served_model_name=STRING,
    max_concurrent_requests=COUNT,
    max_input_length=COUNT,
    max_batch_tokens=COUNT,
    max_batch_requests={"type": ["integer", "null"], "minimum": 0},
    max_client_batch_size=COUNT,
    auto_truncate=BOOLEAN,
    tokenization_workers=COUNT,
    version=STRING,
    sha=NULLABLE_STRING,
    docker_label=NULLABLE_STRING,
)

ERROR_RESPONSE = obj(
    ["error", "error_type"],
    error=STRING,
    error_type={"enum": ["Unhealthy", "Backend", "Overloaded", "Validation", "Tokenizer", "Empty"]},
)

# POST routes that TEI defines and this service serves: (request body, 200 body).
POST_ROUTES: dict[str, tuple[Schema, Schema]] = {
    "/embed": (EMBED_REQUEST, EMBED_RESPONSE),
    "/predict": (PREDICT_REQUEST, PREDICT_RESPONSE),
    "/similarity": (SIMILARITY_REQUEST, SIMILARITY_RESPONSE),
    "/rerank": (RERANK_REQUEST, RERANK_RESPONSE),  # served by a reranker bundle
    "/tokenize": (TOKENIZE_REQUEST, TOKENIZE_RESPONSE),
    "/decode": (DECODE_REQUEST, DECODE_RESPONSE),
    "/v1/embeddings": (OPENAI_REQUEST, OPENAI_RESPONSE),
}
# TEI routes not served yet (README, "The HTTP API"): /embed_all, /embed_sparse, /vertex.
