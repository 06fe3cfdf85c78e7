"""The peers' selections (DART, CDPruner): the static-shape graph forms against the eager per-row oracles, the
oracles against the papers' algorithms written out in numpy, and the compiled graph against the oracle."""

import numpy as np
import onnx
import pytest
import torch

from clse_fx.peer_scores import (
    Instruction,
    cdpruner_kernel,
    cdpruner_relevance,
    cdpruner_selection,
    dart_selection,
    dpp_greedy,
    query_tokens,
)
from clse_fx.plan import PruneConfig, plan_budget
from clse_fx.reference import cdpruner_keep, dart_keep

from .test_compile_parity import TWO_ROWS, _check_against_reference, _inputs


def _features(seed, n, channels, batch=2):
    return torch.randn(batch, n, channels, generator=torch.Generator().manual_seed(seed))


def test_query_tokens_are_the_tokens_after_the_last_visual_token():
    visual = torch.tensor([[0, 1, 1, 0, 1, 0, 0], [1, 1, 0, 0, 0, 0, 1]], dtype=torch.bool)
    expected = [[0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0, 0]]
    assert query_tokens(visual).long().tolist() == expected


def _greedy_log_det(kernel: np.ndarray, keep: int) -> list[int]:
    """Greedy MAP of a DPP by brute force: each step adds the item that maximises log det L[S]."""
    chosen: list[int] = []
    for _ in range(keep):
        rest = [i for i in range(len(kernel)) if i not in chosen]
        dets = [np.linalg.slogdet(kernel[np.ix_(chosen + [i], chosen + [i])])[1] for i in rest]
        chosen.append(rest[int(np.argmax(dets))])
    return chosen


def test_cdpruner_is_greedy_log_det_maximisation_of_the_conditional_kernel():
    """The kernel written out from the paper in numpy (relevance: negated mean cosine similarity to the text,
    min-max normalised, +1e-6); the oracle's and the graph form's choices, in order, equal brute-force greedy
    log-det maximisation on it."""
    z, text = _features(0, 10, 16, batch=1)[0], _features(1, 5, 16, batch=1)[0]
    unit = (z / np.linalg.norm(z, axis=1, keepdims=True)).numpy().astype(np.float64)
    text_unit = (text / np.linalg.norm(text, axis=1, keepdims=True)).numpy().astype(np.float64)
    relevance = -(unit @ text_unit.T).mean(axis=1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    kernel = relevance[:, None] * (unit @ unit.T) * relevance[None, :]
    expected = _greedy_log_det(kernel, 6)
    chosen, closeness = cdpruner_keep(z, text, 6, list(range(10)))
    assert chosen == expected and bool((closeness[chosen] == 1).all()) and bool((closeness <= 1).all())
    instruction = Instruction(text[None], torch.ones(1, 5, dtype=torch.bool))
    order = cdpruner_selection(z[None], instruction, 6, None)[0]
    assert order.argsort(descending=True)[:6].tolist() == expected
    assert torch.allclose(
        cdpruner_kernel(z[None], cdpruner_relevance(z[None], instruction, None))[0].double(),
        torch.from_numpy(kernel),
        atol=1e-5,
    )


def test_dpp_greedy_skips_excluded_tokens_and_takes_spent_ones_in_index_order():
    """Tokens 3..5 repeat 0..2 and token 1 is excluded: one of each duplicate pair is chosen first (its gain ties
    with its twin's, so the lower index), then the spent twins follow lowest index first."""
    base = _features(2, 3, 8, batch=1)
    unit = torch.nn.functional.normalize(torch.cat([base, base], dim=1), dim=-1)
    candidates = torch.tensor([[True, False, True, True, True, True]])
    order = dpp_greedy(unit @ unit.transpose(1, 2), 5, candidates)[0]
    ranked = order.argsort(descending=True).tolist()
    assert order[1] == 0 and sorted(ranked[:3]) == [0, 2, 4] and ranked[3:5] == [3, 5]


def _authors_dart(z, key_norm, text, text_key_norm, keep):
    """DART's selection as its authors' loop runs it (numpy, a quota that divides evenly): 4 visual and 4 text
    pivots by key L1 norm; each pivot in turn takes the tokens of lowest cosine similarity among the rest."""
    unit = z / np.linalg.norm(z, axis=1, keepdims=True)
    text_unit = text / np.linalg.norm(text, axis=1, keepdims=True)
    image_pivots = sorted(np.argsort(-key_norm, kind="stable")[:4].tolist())
    text_pivots = sorted(np.argsort(-text_key_norm, kind="stable")[:4].tolist())
    quota = (keep - 4) // 8
    kept, valid = set(image_pivots), [i for i in range(len(z)) if i not in image_pivots]
    for pivot in [unit[i] for i in image_pivots] + [text_unit[i] for i in text_pivots]:
        similarity = unit[valid] @ pivot
        taken = [valid[i] for i in np.argsort(similarity, kind="stable")[:quota]]
        kept |= set(taken)
        valid = [i for i in valid if i not in taken]
    return sorted(kept)


def test_dart_oracle_follows_the_authors_loop():
    z, text = _features(3, 40, 12, batch=1)[0], _features(4, 6, 12, batch=1)[0]
    norms, text_norms = z.abs().sum(-1), text.abs().sum(-1)
    expected = _authors_dart(z.numpy(), norms.numpy(), text.numpy(), text_norms.numpy(), 4 + 8 * 3)
    assert sorted(dart_keep(z, norms, text, text_norms, 28, list(range(40)))) == expected


@pytest.mark.parametrize("keep", [3, 13, 21])
def test_dart_graph_form_equals_oracle(keep):
    """Per row, with an excluded token, a norm weight, a row of only two instruction tokens, uneven quotas and a
    budget below the pivot count."""
    z, hidden = _features(5, 24, 10), _features(6, 9, 10)
    key_norm, text_norm = z.abs().sum(-1) * 0.5, hidden.abs().sum(-1)
    is_query = torch.zeros(2, 9, dtype=torch.bool)
    is_query[0, 3:], is_query[1, 7:] = True, True
    weight = torch.linspace(0.5, 2.0, 10)
    candidates = torch.ones(2, 24, dtype=torch.bool)
    candidates[:, 4] = False
    chosen = dart_selection(z, key_norm, Instruction(hidden, is_query, text_norm, weight), keep, candidates)
    assert (chosen.sum(dim=1) == keep).all()
    for row in range(2):
        text = is_query[row].nonzero()[:, 0]
        oracle = dart_keep(
            z[row],
            key_norm[row],
            hidden[row, text],
            text_norm[row, text],
            keep,
            [i for i in range(24) if i != 4],
            weight,
        )
        assert chosen[row].nonzero()[:, 0].tolist() == sorted(oracle)
        assert len(oracle) == keep


def test_cdpruner_graph_form_equals_oracle_with_excluded_tokens():
    z, hidden = _features(7, 30, 40), _features(8, 8, 40)
    is_query = torch.zeros(2, 8, dtype=torch.bool)
    is_query[0, 2:], is_query[1, 6:] = True, True
    candidates = torch.ones(2, 30, dtype=torch.bool)
    candidates[:, [0, 11]] = False
    order = cdpruner_selection(z, Instruction(hidden, is_query), 12, candidates)
    for row in range(2):
        text = hidden[row, is_query[row]]
        oracle, _ = cdpruner_keep(z[row], text, 12, [i for i in range(30) if i not in (0, 11)])
        assert order[row].argsort(descending=True)[:12].tolist() == oracle


def test_cdpruner_from_layer0_equals_reference_and_exports_static(tiny_llava, tmp_path):
    """Before the decoder, as the authors prune, then again at layer 2 among what is left: the graph keeps the
    oracle's tokens, and its ONNX graph has no data-dependent ops and keeps the same tokens on ONNX Runtime."""
    from clse_fx.deploy.session import OnnxSession
    from clse_fx.export.onnxruntime import export_onnx

    prune = PruneConfig(plan=plan_budget(None, 4, 36, stages="0:12,2:6"), score="cdpruner")
    pruned, _ = _check_against_reference(tiny_llava, prune, _inputs(tiny_llava, TWO_ROWS))
    path = export_onnx(pruned, tmp_path / "prefill.onnx", optimize=False)
    ops = {node.op_type for node in onnx.load(path, load_external_data=False).graph.node}
    assert not ops & {"NonZero", "Loop", "If", "Scan"}
    engine = OnnxSession(path).run(**dict(zip(pruned.input_names, pruned.example_args)))
    torch_out = pruned.flat()
    assert np.abs(engine[0] - torch_out[0].numpy()).max() <= 1e-4
    assert all(np.array_equal(e, t.numpy()) for e, t in zip(engine[1:4], torch_out[1:4]))  # positions, 2 stages
