"""Low-bit weight ops: ``tokopt::matmul_nbits`` and ``tokopt::embedding_q8``.

    matmul_nbits(x[..., K], qweight[N, K/bs, bs*bits/8] u8, scales[N, K/bs], bias?, bits, block_size, K, N,
                 accuracy_level=0) -> x @ dequant(qweight)^T + bias                  [..., N]
    embedding_q8(table[V, D] u8, scales[V, D/bs], ids, block_size) -> dequant(table)[ids]  [..., D]

Weights are symmetric, block-wise along the input dimension: ``w = (code - 2^(bits-1)) * scale``
with unsigned codes, packed two per byte (low nibble first) at 4 bits. That is ONNX Runtime's
``MatMulNBits`` layout with its default zero point, so the contrib lowering ships the packed
bytes as they are; a last block that runs past K is padded with zero codes' weight (code =
zero point). For targets without contrib ops (TensorRT) ``standardize_nbits`` rewrites each
``MatMulNBits`` into a standard blocked ``DequantizeLinear`` of an INT4/INT8 initializer and a
``MatMul``. The embedding's codes are symmetric int8 stored as ``code + 128`` (uint8, the zero
point ONNX Runtime's ``GatherBlockQuantized`` assumes): it gathers rows and their scales before
dequantizing, one node in ONNX Runtime, and ``standardize_embedding`` gives TensorRT a Gather
and a blocked ``DequantizeLinear``; neither ever materialises the float table.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnxscript import opset23 as op
from onnxscript.values import Op, Opset

from .registry import define_op, round_values

__all__ = ["MATMUL_NBITS", "EMBEDDING_Q8", "pack", "unpack", "dequantize", "standardize_nbits",
           "standardize_embedding", "quantize_table", "BITS"]

BITS = (4, 8)


def _matmul_nbits_schema() -> onnx.defs.OpSchema:
    """ONNX Runtime's contrib op, declared for onnxscript (the onnx package has no contrib schemas)."""
    P, S = onnx.defs.OpSchema.FormalParameter, onnx.defs.OpSchema.FormalParameterOption.Optional
    a = onnx.defs.OpSchema.Attribute
    return onnx.defs.OpSchema(
        "MatMulNBits", "com.microsoft", 1,
        inputs=[P("A", "T1"), P("B", "T2"), P("scales", "T1"), P("zero_points", "T3", param_option=S),
                P("g_idx", "T4", param_option=S), P("bias", "T1", param_option=S)],
        outputs=[P("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)"], ""), ("T2", ["tensor(uint8)"], ""),
                          ("T3", ["tensor(uint8)", "tensor(float)", "tensor(float16)"], ""),
                          ("T4", ["tensor(int32)"], "")],
        attributes=[a(name, onnx.defs.OpSchema.AttrType.INT, "") for name in ("K", "N", "bits", "block_size")] +
        [a("accuracy_level", onnx.helper.make_attribute("accuracy_level", 0), "")])


MatMulNBits = Op(Opset("com.microsoft", 1), "MatMulNBits", _matmul_nbits_schema())


def pack(codes: torch.Tensor, bits: int, block_size: int) -> torch.Tensor:
    """Unsigned codes [N, K] -> MatMulNBits bytes [N, ceil(K/bs), bs*bits/8] (K padded with the
    zero point)."""
    n, k = codes.shape
    blocks = math.ceil(k / block_size)
    full = torch.full((n, blocks * block_size), 1 << (bits - 1), dtype=torch.uint8)
    full[:, :k] = codes.to(torch.uint8)
    if bits == 4:
        full = full[:, 0::2] | (full[:, 1::2] << 4)
    return full.reshape(n, blocks, -1).contiguous()


def unpack(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """MatMulNBits bytes -> unsigned codes [N, blocks*bs]."""
    n = qweight.shape[0]
    flat = qweight.reshape(n, -1)
    if bits == 4:
        flat = torch.stack((flat & 15, flat >> 4), -1).reshape(n, -1)
    return flat


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    n, blocks = scales.shape
    codes = unpack(qweight, bits).float().reshape(n, blocks, -1) - (1 << (bits - 1))
    return (codes * scales[..., None]).reshape(n, -1)[:, :k]


def _int8_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """The activations as MatMulNBits' int8 compute (accuracy level 4) sees them: symmetric int8
    per block of ``block_size`` along K, scale max|x| / 127."""
    k = x.shape[-1]
    pad = (-k) % block_size
    xb = F.pad(x, (0, pad)).reshape(*x.shape[:-1], -1, block_size)
    s = xb.abs().amax(-1, keepdim=True) / 127
    q = torch.where(s > 0, round_values(xb * torch.where(s > 0, 1 / s, 0)), 0)
    return (q * s).reshape(*x.shape[:-1], -1)[..., :k]


def _matmul_nbits(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                  bits: int, block_size: int, in_features: int, out_features: int,
                  accuracy_level: int = 0) -> torch.Tensor:
    if accuracy_level == 4:
        x = _int8_blocks(x, block_size)
    if out_features <= _ROWS:
        return F.linear(x, dequantize(qweight, scales, bits, in_features).to(x.dtype), bias)
    # an LM head over a 152K vocabulary dequantized at once is 4 float copies of it (2 GB): by slices of rows
    out = x.new_empty((*x.shape[:-1], out_features))
    for i in range(0, out_features, _ROWS):
        rows = slice(i, i + _ROWS)
        out[..., rows] = F.linear(x, dequantize(qweight[rows], scales[rows], bits, in_features).to(x.dtype),
                                  None if bias is None else bias[rows])
    return out


_ROWS = 8192


def _matmul_nbits_fake(x, qweight, scales, bias, bits, block_size, in_features, out_features, accuracy_level=0):
    return x.new_empty((*x.shape[:-1], out_features))


def _matmul_nbits_onnx(x, qweight, scales, bias=None, bits: int = 4, block_size: int = 32, in_features: int = 0,
                       out_features: int = 0, accuracy_level: int = 0):
    # scales as one dimension: the layout every ONNX Runtime release reads
    return MatMulNBits(x, qweight, op.Reshape(scales, op.Constant(value_ints=[-1])), None, None, bias,
                       K=in_features, N=out_features, bits=bits, block_size=block_size, accuracy_level=accuracy_level)


def quantize_table(table: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An embedding table [V, D] as embedding_q8 stores it: uint8 codes (symmetric int8 + 128)
    and one scale per block of ``block_size`` along D."""
    v, d = table.shape
    codes, scales = torch.empty(v, d, dtype=torch.uint8), torch.empty(v, d // block_size)
    for i in range(0, v, 4096):   # by slices of rows: a 152K vocabulary's float temporaries are 0.5 GB each
        blocks = table[i:i + 4096].float().reshape(-1, d // block_size, block_size)
        scales[i:i + 4096] = (blocks.abs().amax(-1) / 127).clamp_min(1e-12)
        codes[i:i + 4096] = (torch.round(blocks / scales[i:i + 4096, :, None]).clamp(-127, 127) + 128).reshape(-1, d)
    return codes, scales


def _embedding_q8(table: torch.Tensor, scales: torch.Tensor, ids: torch.Tensor, block_size: int) -> torch.Tensor:
    rows, row_scales = F.embedding(ids, table).float() - 128, F.embedding(ids, scales)
    d = table.shape[-1]
    return (rows.reshape(*ids.shape, -1, block_size) * row_scales[..., None]).reshape(*ids.shape, d)


def _embedding_q8_fake(table, scales, ids, block_size):
    return scales.new_empty((*ids.shape, table.shape[-1]))


def _gather_block_quantized_schema() -> onnx.defs.OpSchema:
    P, S = onnx.defs.OpSchema.FormalParameter, onnx.defs.OpSchema.FormalParameterOption.Optional
    a = onnx.defs.OpSchema.Attribute
    return onnx.defs.OpSchema(
        "GatherBlockQuantized", "com.microsoft", 1,
        inputs=[P("data", "T1"), P("indices", "Tind"), P("scales", "T2"), P("zero_points", "T1", param_option=S)],
        outputs=[P("output", "T2")],
        type_constraints=[("T1", ["tensor(uint8)"], ""), ("T2", ["tensor(float)", "tensor(float16)"], ""),
                          ("Tind", ["tensor(int32)", "tensor(int64)"], "")],
        attributes=[a(name, onnx.defs.OpSchema.AttrType.INT, "")
                    for name in ("bits", "block_size", "gather_axis", "quantize_axis")])


GatherBlockQuantized = Op(Opset("com.microsoft", 1), "GatherBlockQuantized", _gather_block_quantized_schema())


def _embedding_q8_onnx(table, scales, ids, block_size: int = 32):
    return GatherBlockQuantized(table, ids, scales, None, bits=8, block_size=block_size, gather_axis=0, quantize_axis=1)


def standardize_embedding(model) -> int:
    """Rewrite every ``GatherBlockQuantized`` (8-bit, tokopt's layout) of an onnx_ir model into
    standard ONNX: ``DequantizeLinear(Gather(table), Gather(scales), Gather(zero points),
    axis=-1, block_size)``. Returns how many were rewritten."""
    import onnx_ir as ir

    graph, count = model.graph, 0
    for node in list(graph):
        if node.op_type != "GatherBlockQuantized" or node.domain != "com.microsoft":
            continue
        table, ids, scales = node.inputs[:3]
        bs = node.attributes["block_size"].as_int()
        zp = ir.Value(name=f"{table.name}_zero_points", const_value=ir.tensor(
            np.full(scales.shape.numpy() if hasattr(scales.shape, "numpy") else tuple(scales.shape), 128, np.uint8),
            name=f"{table.name}_zero_points"))
        graph.register_initializer(zp)
        rows, row_scales, row_zp = (ir.node("Gather", [t, ids], attributes={"axis": 0}) for t in (table, scales, zp))
        deq = ir.node("DequantizeLinear", [rows.outputs[0], row_scales.outputs[0], row_zp.outputs[0]],
                      attributes={"axis": -1, "block_size": bs})
        graph.insert_before(node, [rows, row_scales, row_zp, deq])
        out = node.outputs[0]
        deq.outputs[0].name, out.name = out.name, f"{out.name}_gbq"
        deq.outputs[0].type, deq.outputs[0].shape = out.type, out.shape
        out.replace_all_uses_with(deq.outputs[0], replace_graph_outputs=True)
        graph.remove(node, safe=True)
        count += 1
    return count


# Hand lowering: ONNX Runtime's GatherBlockQuantized, one node where the decomposition is six
# (Gather, Cast, Sub, Reshape, Gather, Mul): ~40 us of a ~500 us decode step on the reference LM.
EMBEDDING_Q8 = define_op("tokopt::embedding_q8", _embedding_q8, _embedding_q8_fake, onnx=_embedding_q8_onnx,
                         tags=("quant",), standardize=standardize_embedding)


def _int8_block_nodes(x, k: int, bs: int, name: str) -> list:
    """``_int8_blocks`` in standard ONNX nodes (onnx_ir): pad K to blocks, per block scale
    max|x| / 127, round, scale back, unpad. The last node's output is the rounded activation."""
    import onnx_ir as ir

    pad = (-k) % bs
    nodes = []

    def add(op_type, inputs, **attrs):
        nodes.append(ir.node(op_type, [v.outputs[0] if isinstance(v, ir.Node) else v for v in inputs],
                             attributes=attrs))
        return nodes[-1]

    def const(values, dtype=np.int64):
        return add("Constant", [], value=ir.tensor(np.asarray(values, dtype=dtype)))
    lead = add("Shape", [x], end=-1)
    src = x
    if pad:
        zeros = add("Constant", [], value=ir.tensor(np.zeros(1, np.int64)))
        src = add("Pad", [x, add("Concat", [add("Expand", [zeros, add("Shape", [lead])]), const([0]),
                                            add("Expand", [zeros, add("Shape", [lead])]), const([pad])], axis=0)])
    blocks = add("Reshape", [src, add("Concat", [lead, const([-1, bs])], axis=0)])
    scale = add("Div", [add("ReduceMax", [add("Abs", [blocks]), const([-1])], keepdims=1),
                        const(127.0, np.float32)])
    inverse = add("Where", [add("Greater", [scale, const(0.0, np.float32)]), add("Reciprocal", [scale]),
                            const(0.0, np.float32)])
    rounded = add("Mul", [add("Round", [add("Mul", [blocks, inverse])]), scale])
    flat = add("Reshape", [rounded, add("Concat", [lead, const([-1])], axis=0)])
    if pad:
        flat = add("Slice", [flat, const([0]), const([k]), const([-1])])
    return nodes


def standardize_nbits(model) -> int:
    """Rewrite every ``MatMulNBits`` of an onnx_ir model into standard ONNX (opset 21+):
    ``MatMul(x, DequantizeLinear(W[K, N] int4|int8, scales[K/bs, N], axis=0, block_size))``
    (+ ``Add`` bias), the form strongly typed TensorRT builds weight-only int4 engines from. An
    int8-compute node (accuracy level 4) keeps its semantics: its activations are rounded to int8
    per block first, as the reference rounds them (standard ops, no integer kernel).
    Returns how many were rewritten."""
    import ml_dtypes
    import onnx_ir as ir

    graph, count = model.graph, 0
    for node in list(graph):
        if node.op_type != "MatMulNBits" or node.domain != "com.microsoft":
            continue
        a = node.attributes
        k, n, bits, bs = (a[name].as_int() for name in ("K", "N", "bits", "block_size"))
        x, qw, sc = node.inputs[0], node.inputs[1], node.inputs[2]
        if qw.const_value is None or sc.const_value is None:
            continue  # weights computed at run time: not a weight-only matmul TensorRT can build
        bias = node.inputs[5] if len(node.inputs) > 5 else None
        codes = unpack(torch.from_numpy(qw.const_value.numpy()), bits)[:, :k].numpy().T  # [K, N]
        scales = sc.const_value.numpy().reshape(n, -1).T.copy()                          # [K/bs, N]
        # signed codes without a zero point: symmetric INT4 is the form TensorRT builds from
        signed = codes.astype(np.int16) - (1 << (bits - 1))
        dtype = ml_dtypes.int4 if bits == 4 else np.int8
        w = ir.Value(name=f"{qw.name}_std", const_value=ir.tensor(np.ascontiguousarray(signed).astype(dtype),
                                                                  name=f"{qw.name}_std"))
        s = ir.Value(name=f"{sc.name}_std", const_value=ir.tensor(scales, name=f"{sc.name}_std"))
        for v in (w, s):
            graph.register_initializer(v)
        deq = ir.node("DequantizeLinear", [w, s], attributes={"axis": 0, "block_size": bs})
        emulated = _int8_block_nodes(x, k, bs, f"{qw.name}_act") if \
            "accuracy_level" in a and a["accuracy_level"].as_int() == 4 else []
        mm = ir.node("MatMul", [emulated[-1].outputs[0] if emulated else x, deq.outputs[0]])
        new = [*emulated, deq, mm]
        if bias is not None:
            new.append(ir.node("Add", [mm.outputs[0], bias]))
        graph.insert_before(node, new)
        out = node.outputs[0]
        new[-1].outputs[0].name, out.name = out.name, f"{out.name}_nbits"
        new[-1].outputs[0].type, new[-1].outputs[0].shape = out.type, out.shape
        out.replace_all_uses_with(new[-1].outputs[0], replace_graph_outputs=True)
        graph.remove(node, safe=True)
        for v in (qw, sc):
            if not v.uses() and v.name in graph.initializers:
                del graph.initializers[v.name]
        count += 1
    return count


MATMUL_NBITS = define_op("tokopt::matmul_nbits", _matmul_nbits, _matmul_nbits_fake, onnx=_matmul_nbits_onnx,
                         tags=("quant",), standardize=standardize_nbits,
                         # int8 compute rounds activations: ORT's kernel and the reference may differ by a step
                         exact=lambda node: len(node.args) < 9 or node.args[8] == 0)
