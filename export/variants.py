"""Derived graphs: int8 (dynamic quantisation), fp16 (mixed precision), and ORT graph fusions.

Each function reads the fp32 graph and writes a new file; none of them judges the result, the
parity gate (export/parity.py) does.
"""

import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper

# Kept in fp32 in the fp16 graph: normalisation and softmax overflow or lose all precision in
# half (variance of activations in the thousands, exp() of attention scores), and the pooling
# reductions sum up to max_seq_len rows.
FP16_FP32_OPS = ["LayerNormalization", "Softmax", "ReduceMean", "ReduceSum", "Pow", "Sqrt", "Div", "Erf"]
# Dynamic quantisation of the matrix products only: quantising the embedding tables (Gather) saves
# memory but costs accuracy for no speed on CPU.
INT8_OPS = ["MatMul", "Gemm", "Attention"]


def quantize_int8(fp32_path: Path, out_path: Path, fused: bool = False) -> None:
    """Dynamic int8 of the matrix products. A fused graph (fuse_for_ort) is quantised as it is, its
    Attention nodes included (QAttention); a plain one first goes through ORT's quantisation
    pre-processing (shape inference + graph optimisation)."""
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

    with tempfile.TemporaryDirectory(dir=out_path.parent) as scratch:
        source = fp32_path
        if not fused:
            source = Path(scratch) / "preprocessed.onnx"
            # ORT's symbolic shape inference cannot follow the dynamo exporter's shape arithmetic
            # (it raises and drops a temp file in the cwd); ONNX shape inference and ORT's graph
            # optimisation, the parts dynamic quantisation benefits from, still run.
            quant_pre_process(str(fp32_path), str(source), skip_symbolic_shape=True)
        quantize_dynamic(
            str(source),
            str(out_path),
            op_types_to_quantize=INT8_OPS,
            weight_type=QuantType.QInt8,
            # Per-channel 7-bit weight scales: on all-MiniLM-L6-v2 min cosine to fp32 rises from 0.89
            # (per-tensor) to 0.988; 7 bits avoid the u8*s8 saturation of non-VNNI x86 kernels.
            per_channel=True,
            reduce_range=True,
        )


def convert_fp16(fp32_path: Path, out_path: Path) -> None:
    """fp16 weights and activations with fp32 inputs/outputs (keep_io_types), so callers do not change."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(
        onnx.load(str(fp32_path)),
        keep_io_types=True,
        op_block_list=FP16_FP32_OPS,
    )
    onnx.save(model, str(out_path))


def fuse_for_ort(fp32_path: Path, out_path: Path, num_heads: int, hidden_size: int) -> list[str]:
    """ONNX Runtime's fusions for BERT-family encoders; returns the contrib ops in the result, e.g.
    ["Attentionx6", "SkipLayerNormalizationx13"].

    Two passes: onnxscript's ORT fusions first, because they match the attention of the dynamo
    exporter's graphs (scaled_dot_product_attention and its masks), which the transformer optimizer's
    patterns, written for the TorchScript exporter, miss; then ONNX Runtime's transformer optimizer
    (model type bert), the reference recipe's, for the skip-layer-norm, bias and GELU fusions around it.
    """
    import onnx_ir
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    with tempfile.TemporaryDirectory(dir=out_path.parent) as scratch:
        first_pass = Path(scratch) / "onnxscript.onnx"
        rewritten, _ = optimize_for_ort(onnx_ir.load(str(fp32_path)))
        onnx_ir.save(rewritten, str(first_pass))
        model = onnx.load(str(first_pass))
        _give_layer_norms_a_bias(model)
        onnx.save(model, str(first_pass))
        options = FusionOptions("bert")
        # The optimizer's symbolic shape inference fails on the dynamo exporter's shape arithmetic,
        # and without it the skip-layer-norm fusion is skipped; with it off, the fusion takes the
        # residual Add's second input as the skip, which holds for these graphs (the parity gate
        # checks the result).
        options.enable_shape_inference = False
        optimized = optimize_model(
            str(first_pass),
            model_type="bert",
            num_heads=num_heads,
            hidden_size=hidden_size,
            optimization_options=options,
        )
        optimized.save_model_to_file(str(out_path))
    fused_ops = Counter(node.op_type for node in optimized.model.graph.node if node.domain == "com.microsoft")
    return sorted(f"{name}x{count}" for name, count in fused_ops.items())


def _give_layer_norms_a_bias(model: onnx.ModelProto) -> None:
    """Give every bias-free LayerNormalization (the project's own encoder has no biases) an explicit
    zero bias: ONNX Runtime's skip-layer-norm fusion reads the bias input and fails without one."""
    initializers = {initializer.name: initializer for initializer in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "LayerNormalization" or len(node.input) >= 3:
            continue
        bias_name = f"{node.input[1]}_zero_bias"
        if bias_name not in initializers:
            scale = initializers[node.input[1]]
            zeros = np.zeros(list(scale.dims), dtype=onnx.helper.tensor_dtype_to_np_dtype(scale.data_type))
            initializers[bias_name] = onnx.numpy_helper.from_array(zeros, bias_name)
            model.graph.initializer.append(initializers[bias_name])
        node.input.append(bias_name)
