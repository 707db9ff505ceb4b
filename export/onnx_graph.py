"""Torch module -> ONNX graph with the bundle's interface (bundle/contract.py).

Inputs `input_ids` and `attention_mask` (int64, [batch, sequence], both symbolic); outputs
`embedding` and, when the module returns two tensors, `logits`. Uses the dynamo exporter
(torch.export + onnxscript) with `dynamic_shapes`, opset 18, and one self-contained file.
"""

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx
import onnx_ir
import torch

from bundle.contract import INPUT_NAMES, OUTPUT_NAMES
from export.errors import ExportError

OPSET = 18
# onnx refuses protobufs over 2 GB; larger models would need external data files, which the bundle
# format does not carry.
MAX_SINGLE_FILE_BYTES = 2 * 1024**3


def output_names_for(module: torch.nn.Module) -> list[str]:
    """Run the module once to learn whether it has a classifier head (a second output)."""
    example_ids, example_mask = example_inputs()
    with torch.inference_mode():
        outputs = module(example_ids, example_mask)
    if not isinstance(outputs, tuple | list) or len(outputs) not in (1, 2):
        raise ExportError("the model must return (embedding,) or (embedding, logits)")
    return list(OUTPUT_NAMES[: len(outputs)])


def example_inputs(batch: int = 2, sequence: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    # Ids 5.. skip the special tokens; batch and sequence > 1 so that the exporter does not
    # specialise either axis to a constant.
    input_ids = (torch.arange(batch * sequence, dtype=torch.int64).reshape(batch, sequence) % 20) + 5
    attention_mask = torch.ones(batch, sequence, dtype=torch.int64)
    attention_mask[1, sequence // 2 :] = 0
    return input_ids, attention_mask


def export_onnx(module: torch.nn.Module, path: Path, max_seq_len: int) -> list[str]:
    """Export `module` to `path` as one self-contained file; returns the output names."""
    module = module.eval()
    output_names = output_names_for(module)
    batch = torch.export.Dim("batch")
    sequence = torch.export.Dim("sequence", max=max_seq_len)
    axes = {0: batch, 1: sequence}
    with warnings.catch_warnings(), _exporter_logs_silenced():
        # The exporter warns about axis renaming and deprecations that do not concern the result.
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                module,
                example_inputs(),
                dynamo=True,
                input_names=list(INPUT_NAMES),
                dynamic_shapes={"input_ids": axes, "attention_mask": axes},
                opset_version=OPSET,
                external_data=False,
                verbose=False,
            )
        except Exception as exc:  # the exporter raises many types; the user needs the first line
            raise ExportError(f"torch.onnx.export failed: {str(exc).strip().splitlines()[0]}") from exc
    assert program is not None
    _rename_outputs(program.model, output_names)
    program.save(str(path), external_data=False)
    if path.stat().st_size >= MAX_SINGLE_FILE_BYTES:
        raise ExportError(f"{path.name}: the graph is over 2 GB, which the bundle format does not support")
    check_interface(path, output_names)
    return output_names


def _rename_outputs(model: onnx_ir.Model, output_names: list[str]) -> None:
    # torch.onnx names intermediate values after the aten op, so an nn.Embedding yields a value
    # called "embedding"; passing output_names= then produces a duplicate name and an invalid graph.
    # Rename clashing intermediates first, then the outputs.
    graph = model.graph
    outputs = list(graph.outputs)
    for node in graph:
        for value in node.outputs:
            if value.name in output_names and value not in outputs:
                value.name = f"{value.name}_intermediate"
    for value, name in zip(outputs, output_names, strict=True):
        value.name = name


@contextmanager
def _exporter_logs_silenced() -> Iterator[None]:
    # The exporter logs a line per unavailable torchvision op; noise on a command's stderr.
    logger = logging.getLogger("torch.onnx")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)


def check_interface(path: Path, output_names: list[str]) -> None:
    """Assert the graph's inputs/outputs match the bundle contract, with symbolic batch/sequence axes."""
    graph = onnx.load(str(path), load_external_data=False).graph
    inputs = {value.name: value for value in graph.input}
    if sorted(inputs) != sorted(INPUT_NAMES):
        raise ExportError(f"{path.name}: graph inputs are {sorted(inputs)}, expected {list(INPUT_NAMES)}")
    for name in INPUT_NAMES:
        tensor_type = inputs[name].type.tensor_type
        if tensor_type.elem_type != onnx.TensorProto.INT64:
            raise ExportError(f"{path.name}: input {name} must be int64")
        dims = list(tensor_type.shape.dim)
        if len(dims) != 2 or not all(dim.dim_param and not dim.HasField("dim_value") for dim in dims):
            shown = [dim.dim_param or dim.dim_value for dim in dims]
            raise ExportError(
                f"{path.name}: input {name} has shape {shown}; batch and sequence must be symbolic"
            )
    outputs = [value.name for value in graph.output]
    if outputs != output_names:
        raise ExportError(f"{path.name}: graph outputs are {outputs}, expected {output_names}")
    for value in graph.output:
        batch_dim = value.type.tensor_type.shape.dim[0]
        if not batch_dim.dim_param:
            raise ExportError(f"{path.name}: output {value.name} has a fixed batch axis")
