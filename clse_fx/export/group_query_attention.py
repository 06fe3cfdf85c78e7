"""ONNX translation of :func:`clse_fx.decode.group_query_attention`: ONNX Runtime's contrib op
``com.microsoft::GroupQueryAttention``, the attention of ONNX Runtime GenAI's CPU decoders.

The decode step reads each layer's KV buffer and writes the new token's key/value into it; bound as both the
``past_key`` input and the ``present_key`` output (same memory), the op does that write in place, so the runtime
writes nothing and no buffer is copied (ONNX Runtime's CPU kernel compares the two pointers; apart, it copies the
filled slots into the output, which is correct but O(cache) per step). torch.onnx builds a node only for ops whose
schema the ``onnx`` package knows, and that package does not know ONNX Runtime's contrib ops: ONNX Runtime's own
schema of the op is registered with it first (the checker then validates the node against it).
"""

from __future__ import annotations

import onnx

CONTRIB_DOMAIN = "com.microsoft"
GROUP_QUERY_ATTENTION = "GroupQueryAttention"


def translation_table() -> dict:
    """``custom_translation_table`` for torch.onnx.export: the decode step's attention op -> GroupQueryAttention."""
    import torch

    import clse_fx.decode  # noqa: F401 - defines torch.ops.clse.group_query_attention

    register_onnxruntime_schema(GROUP_QUERY_ATTENTION, CONTRIB_DOMAIN, needs=("attention_bias",))
    return {torch.ops.clse.group_query_attention.default: _group_query_attention}


def _group_query_attention(
    query,
    key,
    value,
    past_key,
    past_value,
    seqlens_k,
    total,
    attention_bias,
    num_heads: int,
    kv_num_heads: int,
    scale: float,
):
    import onnxscript

    contrib = onnxscript.values.Opset(CONTRIB_DOMAIN, 1)
    inputs = (query, key, value, past_key, past_value, seqlens_k, total)
    no_rotary = (None, None, None)  # cos_cache, sin_cache, position_ids: the model's own rotary ran before
    attributes = {"num_heads": num_heads, "kv_num_heads": kv_num_heads, "scale": scale}
    output, present_key, present_value, _ = contrib.GroupQueryAttention(
        *inputs, *no_rotary, attention_bias, **attributes
    )
    # The exporter gives the node every output of the schema; ONNX Runtime refuses the optional output_qk unless
    # the qk_output attribute asks for it.
    output.producer().resize_outputs(3)
    return output, present_key, present_value


def register_onnxruntime_schema(name: str, domain: str, needs: tuple[str, ...] = ()) -> None:
    """Register ONNX Runtime's schema of the contrib op ``domain::name`` with the ``onnx`` package (once per
    process): its inputs, outputs, type constraints and attributes as ONNX Runtime states them. An onnxruntime
    whose op lacks one of the inputs named in ``needs`` is a one-line error."""
    if onnx.defs.has(name, domain):
        return
    from onnxruntime.capi.onnxruntime_pybind11_state import get_all_operator_schema

    found = [s for s in get_all_operator_schema() if s.name == name and s.domain == domain]
    schema = max(found, key=lambda s: s.since_version) if found else None
    missing = [need for need in needs if schema is None or need not in [p.name for p in schema.inputs]]
    if schema is None or missing:
        lacks = f"takes no {missing[0]}" if schema else "is missing"
        raise RuntimeError(f"this onnxruntime's {domain}::{name} {lacks}; upgrade onnxruntime (1.32 is tested)")
    OpSchema = onnx.defs.OpSchema

    def parameters(formals) -> list:
        return [
            OpSchema.FormalParameter(
                p.name, p.typeStr, p.description, param_option=getattr(OpSchema.FormalParameterOption, p.option.name)
            )
            for p in formals
        ]

    attributes = [
        OpSchema.Attribute(a.name, getattr(OpSchema.AttrType, a.type.name), a.description, required=a.required)
        for a in schema.attributes.values()
    ]
    constraints = [(t.type_param_str, list(t.allowed_type_strs), t.description) for t in schema.type_constraints]
    onnx.defs.register_schema(
        OpSchema(
            name,
            domain,
            schema.since_version,
            schema.doc,
            inputs=parameters(schema.inputs),
            outputs=parameters(schema.outputs),
            type_constraints=constraints,
            attributes=attributes,
        )
    )
