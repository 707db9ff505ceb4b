"""JSON answers rendered without blocking the event loop for long (docs/architecture.md, "Life of a
request"): orjson directly, numpy arrays included, in slices for long answers."""

import asyncio
from typing import Any, TypeGuard

import numpy as np
import orjson
from fastapi.responses import Response

# Rows of a long list or matrix rendered between two turns of the event loop: 32 rows of 1,024 floats
# take about 2 ms, where a whole 1,000-row answer held the loop (and every other request) for 75 ms.
ROWS_PER_SLICE = 32


def _long(value: object) -> TypeGuard[list[Any] | np.ndarray]:
    return isinstance(value, list | np.ndarray) and len(value) > ROWS_PER_SLICE


async def render_json(content: object) -> bytes:
    """JSON of `content`, numpy arrays included, rendered by orjson directly (response_model validation
    and json.dumps of thousands of floats were the largest costs on the event loop: 0.75 ms per 8x256
    response; orjson: 0.04 ms). A long list or matrix, at the top or as a value of the top object, is
    rendered ROWS_PER_SLICE rows at a time, letting the event loop serve other requests in between;
    anything else (most answers) in one call."""
    if isinstance(content, dict) and any(_long(value) for value in content.values()):
        members = [orjson.dumps(key) + b":" + await render_json(value) for key, value in content.items()]
        return b"{" + b",".join(members) + b"}"
    if _long(content):
        slices = []
        for start in range(0, len(content), ROWS_PER_SLICE):
            rows = orjson.dumps(content[start : start + ROWS_PER_SLICE], option=orjson.OPT_SERIALIZE_NUMPY)
            slices.append(rows[1:-1])  # without the slice's own brackets
            await asyncio.sleep(0)
        return b"[" + b",".join(slices) + b"]"
    return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


async def json_response(content: object, headers: dict[str, str] | None = None) -> Response:
    return Response(await render_json(content), media_type="application/json", headers=headers)
