import pytest
import torch
from transformers import LlavaForConditionalGeneration

from clse_fx.plan import PruneConfig, plan_budget
from clse_fx.reference import reference_prune
from clse_fx.scoring import SCORE_TYPES, evolution_factor, spectral_energy

from .conftest import prompt_ids

TEXT = [5, 7, 8, 9, 10, 11, 12, 13]


def _pixels(batch, model, images=1, seed=0):
    size = model.config.vision_config.image_size
    return torch.randn(batch * images, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _plain_logits(model, ids, pixels, **kw):
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels, **kw).logits


def _config(model, stages, score="clse_attn", kv_policy="uniform", images=1):
    per_image = 36 if model.config.vision_config.image_size == 48 else 25
    plan = plan_budget(None, model.config.text_config.num_hidden_layers, per_image * images, stages=stages)
    return PruneConfig(plan=plan, score=score, kv_policy=kv_policy)


@pytest.mark.parametrize("score", SCORE_TYPES)
def test_pruning_disabled_equals_plain_model(tiny_llava, score):
    ids = prompt_ids(tiny_llava, [[5, 7, "img", 8, 9], [5, 7, 8, 9, "img"]])
    pixels = _pixels(2, tiny_llava)
    out = reference_prune(tiny_llava, _config(tiny_llava, "1:36,2:36,3:36", score), ids, pixels)
    assert (out.logits - _plain_logits(tiny_llava, ids, pixels)).abs().max() <= 1e-6
    assert torch.equal(out.positions, torch.arange(ids.shape[1]).expand(2, -1))


def test_prompt_without_image_is_unpruned(tiny_llava):
    ids = torch.tensor([TEXT, TEXT[::-1]])
    out = reference_prune(tiny_llava, _config(tiny_llava, "1:10"), ids)
    assert out.kept == [] and out.logits.shape[1] == len(TEXT)
    assert (out.logits - _plain_logits(tiny_llava, ids, None)).abs().max() <= 1e-6


def _independent_stage1(model, ids, pixels, layer, keep, score):
    """Stage-1 kept indices per row from the plain model's eager attentions and hidden states (fft oracle)."""
    eager = LlavaForConditionalGeneration.from_pretrained(model.name_or_path, attn_implementation="eager").eval()
    with torch.no_grad():
        out = eager(input_ids=ids, pixel_values=pixels, output_attentions=True, output_hidden_states=True)
    rows = []
    for row in range(ids.shape[0]):
        vis = (ids[row] == model.config.image_token_id).nonzero()[:, 0]
        attn = out.attentions[layer - 1][row, :, -1, :].mean(0)[vis]
        z_ref, z_cur = out.hidden_states[0][row, vis][None], out.hidden_states[layer][row, vis][None]
        grid = (len(vis) // 36, 6, 6)
        evo = evolution_factor(spectral_energy(z_ref, grid, impl="fft"), spectral_energy(z_cur, grid, impl="fft"))[0]
        scores = {"clse_attn": evo * attn, "clse": evo, "attn": attn, "l2": z_cur[0].norm(dim=-1)}[score]
        # evo saturates at exactly 1.0 in float32 (sigmoid(z / 0.1)), so ties are real: lower index wins.
        rows.append(torch.sort(scores, descending=True, stable=True).indices[:keep].sort().values)
    return torch.stack(rows)


@pytest.mark.parametrize("score", ["clse_attn", "clse", "attn", "l2"])
@pytest.mark.parametrize("layer", [1, 2])
def test_stage1_kept_indices_match_independent_per_row_computation(tiny_llava, score, layer):
    ids = prompt_ids(tiny_llava, [[5, "img", 7, 8, 9, 10, 11], [5, 7, 8, 9, 10, "img", 11]])
    pixels = _pixels(2, tiny_llava)
    out = reference_prune(tiny_llava, _config(tiny_llava, f"{layer}:12", score), ids, pixels)
    assert torch.equal(out.kept[0], _independent_stage1(tiny_llava, ids, pixels, layer, 12, score))


@pytest.mark.parametrize("score", SCORE_TYPES)
@pytest.mark.parametrize("kv_policy", ["uniform", "per-layer"])
def test_batch_rows_equal_single_row_runs(tiny_llava, score, kv_policy):
    ids = prompt_ids(tiny_llava, [[5, "img", 7, 8, 9, 10, 11], [5, 7, 8, 9, 10, "img", 11]])
    pixels = _pixels(2, tiny_llava)
    config = _config(tiny_llava, "1:20,2:10,3:4", score, kv_policy)
    batched = reference_prune(tiny_llava, config, ids, pixels)
    assert [k.shape for k in batched.kept] == [(2, 20), (2, 10), (2, 4)]
    assert batched.logits.shape[:2] == (2, ids.shape[1] - 36 + 4)
    for row in range(2):
        single = reference_prune(tiny_llava, config, ids[row : row + 1], pixels[row : row + 1])
        for kept_b, kept_s in zip(batched.kept, single.kept):
            assert torch.equal(kept_b[row], kept_s[0])
        assert (batched.logits[row] - single.logits[0]).abs().max() <= 1e-5
        assert torch.equal(batched.positions[row], single.positions[0])
    # Later stages choose among what the earlier ones kept.
    for earlier, later in zip(batched.kept, batched.kept[1:]):
        assert all(set(later[r].tolist()) <= set(earlier[r].tolist()) for r in range(2))


def test_kept_positions_are_text_plus_kept_visual(tiny_llava):
    ids = prompt_ids(tiny_llava, [[5, 7, "img", 8, 9], [5, 7, 8, 9, "img"]])
    out = reference_prune(tiny_llava, _config(tiny_llava, "2:9"), ids, _pixels(2, tiny_llava))
    for row in range(2):
        vis = (ids[row] == tiny_llava.config.image_token_id).nonzero()[:, 0]
        text = (ids[row] != tiny_llava.config.image_token_id).nonzero()[:, 0]
        expected = torch.cat([text, vis[out.kept[0][row]]]).sort().values
        assert torch.equal(out.positions[row], expected)


def test_kv_cache_policies(tiny_llava):
    ids = prompt_ids(tiny_llava, [[5, "img", 7, 8]])
    pixels = _pixels(1, tiny_llava)
    uniform = reference_prune(tiny_llava, _config(tiny_llava, "1:20,3:5"), ids, pixels)
    per_layer = reference_prune(tiny_llava, _config(tiny_llava, "1:20,3:5", kv_policy="per-layer"), ids, pixels)
    s = ids.shape[1]
    assert [k.shape[2] for k, _ in per_layer.cache] == [s, s - 16, s - 16, s - 31]
    assert [k.shape[2] for k, _ in uniform.cache] == [s - 31] * 4
    # Uniform = per-layer caches re-indexed to the final kept set.
    for (ku, vu), (kp, vp), pos in zip(uniform.cache, per_layer.cache, per_layer.cache_positions):
        index = torch.searchsorted(pos[0], uniform.positions[0])
        assert torch.equal(ku, kp[:, :, index]) and torch.equal(vu, vp[:, :, index])
    # The last layer's cache is the keys of the final tokens under both policies.
    assert torch.equal(uniform.cache[-1][0], per_layer.cache[-1][0])


def test_two_images_in_one_prompt(tiny_llava):
    ids = prompt_ids(tiny_llava, [[5, "img", 7, "img", 8], [5, 7, "img", "img", 8]])
    pixels = _pixels(2, tiny_llava, images=2)
    config = _config(tiny_llava, "1:72,2:72,3:72", images=2)
    noop = reference_prune(tiny_llava, config, ids, pixels)
    assert (noop.logits - _plain_logits(tiny_llava, ids, pixels)).abs().max() <= 1e-6
    out = reference_prune(tiny_llava, _config(tiny_llava, "1:30", images=2), ids, pixels)
    assert out.kept[0].shape == (2, 30)
    assert torch.equal(out.kept[0], _independent_stage1(tiny_llava, ids, pixels, 1, 30, "clse_attn"))


def test_odd_grid_deeper_model(odd_llava):
    ids = prompt_ids(odd_llava, [[5, "img", 7, 8, 9], [5, 7, 8, "img", 9]])
    pixels = _pixels(2, odd_llava)
    plan = plan_budget(10, 5, 25)
    out = reference_prune(odd_llava, PruneConfig(plan=plan), ids, pixels)
    assert [k.shape[1] for k in out.kept] == [keep for _, keep in plan.stages]
    noop = reference_prune(odd_llava, PruneConfig(plan=plan_budget(25, 5, 25)), ids, pixels)
    assert (noop.logits - _plain_logits(odd_llava, ids, pixels)).abs().max() <= 1e-6


def test_left_padded_batch(tiny_llava):
    pad = tiny_llava.config.text_config.pad_token_id
    ids = prompt_ids(tiny_llava, [[pad, pad, 5, "img", 7], [5, 7, "img", 8, 9]])
    mask = (ids != pad).long()
    pixels = _pixels(2, tiny_llava)
    noop = reference_prune(tiny_llava, _config(tiny_llava, "1:36"), ids, pixels, attention_mask=mask)
    plain = _plain_logits(tiny_llava, ids, pixels, attention_mask=mask)
    assert (noop.logits - plain).abs()[mask.bool()].max() <= 1e-6
    pruned = reference_prune(tiny_llava, _config(tiny_llava, "1:10"), ids, pixels, attention_mask=mask)
    single = reference_prune(tiny_llava, _config(tiny_llava, "1:10"), ids[:1, 2:], pixels[:1])
    assert torch.equal(pruned.kept[0][0], single.kept[0][0])
    assert (pruned.logits[0, 2:] - single.logits[0]).abs().max() <= 1e-5


def test_bad_inputs(tiny_llava):
    mixed = prompt_ids(tiny_llava, [[5, "img", 7], [5, *([7] * 37)]])
    with pytest.raises(ValueError, match="different visual-token counts"):
        reference_prune(tiny_llava, _config(tiny_llava, "1:10"), mixed, _pixels(1, tiny_llava))
    ids = prompt_ids(tiny_llava, [[5, "img", 7]])
    with pytest.raises(ValueError, match="plan is for 5 layers"):
        reference_prune(
            tiny_llava, PruneConfig(plan=plan_budget(None, 5, 36, stages="1:4")), ids, _pixels(1, tiny_llava)
        )
