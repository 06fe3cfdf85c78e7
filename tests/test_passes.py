"""One test per pass, on the traced tiny LLaVA graph."""

import pytest
import torch

from clse_fx.compiler import pass_settings
from clse_fx.passes import run_passes
from clse_fx.passes.layer_boundaries import attention_node, layer_input, layer_nodes, module_path
from clse_fx.passes.ops import gather_sequence, masked_scatter_static, stage_nodes
from clse_fx.passes.static_masked_scatter import static_masked_scatter
from clse_fx.passes.strip_asserts import strip_asserts
from clse_fx.plan import PruneConfig, plan_budget
from clse_fx.trace import example_args, trace_prefill

from .conftest import prompt_ids


def _inputs(model):
    ids = prompt_ids(model, [[5, "img", 7, 8], [5, 7, "img", 8]])
    size = model.config.vision_config.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


def _traced(model):
    inputs = _inputs(model)
    return trace_prefill(model, inputs), inputs


def _settings(model, inputs, stages="2:9", **prune):
    return pass_settings(model, PruneConfig(plan=plan_budget(None, 4, 36, stages=stages), **prune), inputs)


def _targets(gm):
    return {node.target for node in gm.graph.nodes if node.op == "call_function"}


def test_strip_asserts_removes_checks_and_keeps_outputs(tiny_llava):
    gm, inputs = _traced(tiny_llava)
    args = example_args(tiny_llava, inputs)
    before = gm(*args)
    assert torch.ops.aten._is_all_true.default in _targets(gm)
    gm = strip_asserts(gm, _settings(tiny_llava, inputs))
    targets = _targets(gm)
    assert not {torch.ops.aten._is_all_true.default, torch.ops.aten._assert_scalar.default} & targets
    assert torch.ops.aten._assert_tensor_metadata.default not in targets
    assert not any(node.op == "call_module" for node in gm.graph.nodes)
    assert torch.equal(gm(*args)[0], before[0])


def test_static_masked_scatter_matches_torch():
    torch.manual_seed(0)
    x = torch.randn(3, 7, 5)
    mask = torch.rand(3, 7, 1) < 0.4
    source = torch.randn(int(mask.sum()), 5)
    assert torch.equal(masked_scatter_static(x, mask, source), x.masked_scatter(mask, source))
    assert torch.equal(masked_scatter_static(x, torch.zeros_like(mask), source[:1]), x)


def test_static_masked_scatter_pass(tiny_llava):
    gm, inputs = _traced(tiny_llava)
    args = example_args(tiny_llava, inputs)
    before = gm(*args)
    settings = _settings(tiny_llava, inputs)
    gm = static_masked_scatter(strip_asserts(gm, settings), settings)
    assert torch.ops.aten.masked_scatter.default not in _targets(gm)
    assert torch.equal(gm(*args)[0], before[0])


def test_layer_boundaries_from_module_stack(tiny_llava):
    gm, _ = _traced(tiny_llava)
    layers = layer_nodes(gm.graph, "model.language_model.layers")
    assert sorted(layers) == [0, 1, 2, 3]
    for index, nodes in layers.items():
        assert all(f"language_model.layers.{index}" in module_path(n) for n in nodes)
        assert "self_attn" in module_path(attention_node(nodes))
        # The residual input of layer i > 0 is the last node of layer i - 1 (its output).
        if index:
            assert layer_input(nodes) is layers[index - 1][-1]
    # The vision tower's encoder layers are not decoder layers.
    assert not any("vision_tower" in module_path(n) for nodes in layers.values() for n in nodes)


def test_gather_sequence_handles_broadcast_batch_and_two_seq_dims():
    index = torch.tensor([[0, 2], [1, 3]])
    table = torch.arange(4.0)[None, :, None].expand(1, 4, 3)  # [1, S, D], shared by the batch
    assert gather_sequence(table, index, 0, (1,))[:, :, 0].tolist() == [[0, 2], [1, 3]]
    mask = torch.arange(16).reshape(1, 1, 4, 4).expand(2, 1, 4, 4)
    gathered = gather_sequence(mask, index, 0, (2, 3))
    assert gathered[1, 0].tolist() == [[5, 7], [13, 15]]


def test_run_passes_dumps_graph_before_and_after(tiny_llava, tmp_path):
    gm, inputs = _traced(tiny_llava)
    dump = tmp_path / "graph.txt"
    prune = PruneConfig(plan=plan_budget(None, 4, 36, stages="2:9"))
    settings = pass_settings(tiny_llava, prune, inputs, dump_graph=str(dump))
    assert [(spec.layer, spec.keep, spec.num_current) for spec in settings.stages] == [(2, 9, 36)]
    gm = run_passes(gm, settings)
    text = dump.read_text()
    for title in ("before strip_asserts", "before static_masked_scatter", "before insert_clse_stages", "after all"):
        assert title in text
    assert "clse_stage" in text.split("after all passes")[1]
    logits, positions, kept, *cache, valid = gm(*example_args(tiny_llava, inputs))
    assert positions.shape[1] == inputs["input_ids"].shape[1] - 36 + 9 and kept.shape == (2, 9)
    assert logits.shape[1] == 1  # the last position's
    assert len(cache) == 2 * 4  # (key, value) per layer, from expose_kv_cache
    assert valid.tolist() == [True, True]  # from expose_row_validity


def test_expose_kv_cache_policies(tiny_llava):
    """Per-layer caches keep each layer's length; uniform ones are re-indexed to the final kept set."""
    from clse_fx.passes.expose_kv_cache import expose_kv_cache
    from clse_fx.passes.insert_clse_stages import insert_clse_stages

    caches = {}
    for policy in ("per-layer", "uniform"):
        gm, inputs = _traced(tiny_llava)
        settings = _settings(tiny_llava, inputs, stages="1:20,3:5", kv_policy=policy)
        gm = static_masked_scatter(strip_asserts(gm, settings), settings)
        gm = expose_kv_cache(insert_clse_stages(gm, settings), settings)
        logits, positions, kept_0, kept_1, *cache = gm(*example_args(tiny_llava, inputs))
        caches[policy] = cache
        s = inputs["input_ids"].shape[1]
        lengths = [s, s - 16, s - 16, s - 31] if policy == "per-layer" else [s - 31] * 4
        assert [t.shape[2] for t in cache] == [n for n in lengths for _ in range(2)]
        assert all(t.shape[1] == tiny_llava.config.text_config.num_key_value_heads for t in cache)
        # The stages are read back from the graph: each one's spec and its survivor index.
        assert [(spec.layer, spec.keep) for spec, _ in stage_nodes(gm.graph)] == [(1, 20), (3, 5)]
    # Both policies agree on the last layer, which ran on the final set.
    assert torch.equal(caches["uniform"][-1], caches["per-layer"][-1])


def test_trace_runs_once_per_geometry_and_weights(tiny_llava, monkeypatch):
    """Compiles of one model and geometry share a trace (each gets its own copy to rewrite); new weights or a new
    geometry trace again."""
    import copy

    import clse_fx.trace

    model = copy.deepcopy(tiny_llava)
    exports = []
    real = clse_fx.trace._export_dynamic
    monkeypatch.setattr(clse_fx.trace, "_export_dynamic", lambda *a: exports.append(1) or real(*a))
    _, inputs = _traced(model)
    first, second = trace_prefill(model, inputs), trace_prefill(model, inputs)
    assert len(exports) == 1 and first.graph is not second.graph
    strip_asserts(first, _settings(model, inputs))  # rewriting one copy leaves the next untouched
    assert torch.ops.aten._is_all_true.default in _targets(trace_prefill(model, inputs))
    single = {name: tensor[:1] for name, tensor in inputs.items()}
    trace_prefill(model, single)
    assert len(exports) == 2
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)  # in place: the cached graphs would serve stale weights
    logits = trace_prefill(model, inputs)(*example_args(model, inputs))[0]
    assert len(exports) == 3
    with torch.no_grad():
        assert torch.allclose(logits, model(**inputs, logits_to_keep=1).logits, atol=1e-5)


def test_trace_keeps_the_batch_symbolic_past_sdpa_backend_selection(tiny_llava, monkeypatch):
    """torch 2.11's SDPA backend selectors (CPU, and CUDA in half precision) ask ``attn_mask.size(0) == 1`` with
    a plain guard, which specialises the batch and fails the export. Emulated here on any version: when a fused
    backend is enabled, the call evaluates the same comparison. The trace enables only the math backend, so
    nothing guards, and the graph keeps the backend-neutral SDPA op (the runtime still picks its kernel)."""
    import contextlib
    import copy

    import torch.nn.functional as F

    import clse_fx.trace

    real = F.scaled_dot_product_attention

    def selecting_sdpa(query, key, value, attn_mask=None, *args, **kwargs):
        fused = torch.backends.cuda.flash_sdp_enabled() or torch.backends.cuda.mem_efficient_sdp_enabled()
        if fused and attn_mask is not None and attn_mask.dim() == 4:
            bool(attn_mask.shape[0] == 1)  # sdp::check_attn_mask_shape in torch 2.11
        return real(query, key, value, attn_mask, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", selecting_sdpa)
    # A batch of 1: the 0/1 specialisation case.
    inputs = {name: tensor[:1] for name, tensor in _inputs(tiny_llava).items()}
    with monkeypatch.context() as unfixed:  # the emulation reproduces the failure without the math-only trace
        unfixed.setattr(clse_fx.trace, "sdpa_kernel", lambda backends: contextlib.nullcontext())
        with pytest.raises(torch._dynamo.exc.UserError, match="Constraints violated"):
            trace_prefill(copy.deepcopy(tiny_llava), inputs)
    model = copy.deepcopy(tiny_llava)  # a trace of its own, made through the emulated selector
    gm = trace_prefill(model, inputs)
    assert torch.ops.aten.scaled_dot_product_attention.default in _targets(gm)
    gm = run_passes(gm, _settings(model, inputs))  # the passes need the batch symbol
    assert gm(*example_args(model, inputs))[0].shape[0] == 1
