"""TEI's tokenizer routes, `POST /tokenize` and `POST /decode`: the bundle's tokenizer, no model run, so
clients can count and inspect tokens (and send the IDs back as inputs). Same limits as the model's
routes; the tokenizer runs on a worker thread, off the event loop."""

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.pipeline import check_batch_size, check_inputs, check_token_ids, resolve_prompt
from service.responses import json_response
from service.routes import TEI_ERRORS, State, route_model
from service.schemas import DecodeRequest, DecodeResponse, TokenizeRequest, TokenizeResponse

router = APIRouter()


@router.post("/tokenize", response_model=TokenizeResponse, responses=TEI_ERRORS)
async def tokenize(body: TokenizeRequest, request: Request, state: State) -> Response:
    """Every token of each text, uncut, the prompt (named or the model's default) included: id, text,
    whether it is a special token, and its UTF-8 byte offsets in the prompted text (TEI's shape)."""
    model = route_model(state, request).model
    prompt = resolve_prompt(body.prompt_name, model)
    texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    check_batch_size(len(texts), state)
    # Nothing is cut here, so a text over max_input_chars is refused as with truncate=false.
    check_inputs(list(texts), truncate=False, state=state, model=model)
    prompted = [prompt + text if prompt else text for text in texts]
    tokens = await asyncio.to_thread(model.tokenizer.tokens, prompted, body.add_special_tokens)
    return await json_response(tokens)


@router.post("/decode", response_model=DecodeResponse, responses=TEI_ERRORS)
async def decode(body: DecodeRequest, request: Request, state: State) -> Response:
    """The text of each list of token IDs (one list, or a batch of lists)."""
    model = route_model(state, request).model
    batch = body.batch()
    check_batch_size(len(batch), state)
    check_token_ids(batch, model)
    texts = await asyncio.to_thread(model.tokenizer.decode, batch, body.skip_special_tokens)
    return await json_response(texts)
