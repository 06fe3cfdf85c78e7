"""Deployable generation: the ONNX bundle's prefill + decode against the oracles."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlamaConfig

import clse_fx
from clse_fx.deploy.cli import run_main
from clse_fx.deploy.engine import Engine, SamplingConfig
from clse_fx.metrics import kv_cache_bytes, kv_cache_tokens
from clse_fx.plan import PruneConfig, plan_budget
from clse_fx.reference import reference_generate

from .conftest import assert_decodes_like_portable, prompt_ids

TEXT_LEN = 8
STAGES = "1:20,2:10,3:4"
UNPRUNED = (1, "uniform", "1:36,2:36,3:36")  # batch 1, every stage keeps all 36 visual tokens
LAYOUTS = {
    1: [[5, 7, "img", 8, 9, 10, 11, 12, 13]],
    2: [[5, "img", 7, 8, 9, 10, 11, 12, 13], [5, 7, 8, 9, 10, 11, "img", 12, 13]],
}
# The uniform-KV bundle is the shared CLI bundle (conftest.cli_bundle: --keep 8 --batch 2 --text-len 12).
CLI_PLAN = plan_budget(8, 4, 36)
CLI_LAYOUT = [[5, "img", *range(7, 18)], [*range(5, 11), "img", *range(11, 17)]]


@pytest.fixture(scope="module")
def bundles(tiny_llava, tiny_llava_dir, cli_bundle, tmp_path_factory):
    """Bundles by KV policy: "uniform" (the CLI bundle), "per-layer" (batch 2, STAGES) and UNPRUNED."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_llava_dir)
    made = {"uniform": cli_bundle[0]}
    for key, batch, policy, stages in [("per-layer", 2, "per-layer", STAGES), (UNPRUNED, *UNPRUNED)]:
        out = tmp_path_factory.mktemp("bundle") / "b"
        clse_fx.compile(
            tiny_llava,
            stages=stages,
            kv_policy=policy,
            batch=batch,
            text_len=TEXT_LEN,
            output_dir=out,
            processor=processor,
            verify=False,  # this file checks the bundles against the reference itself
            optimize_onnx=False,  # the graphs the optimizer rewrites are checked in test_onnx_export.py
        )
        made[key] = out
    return made


def _prune(policy: str) -> PruneConfig:
    """What the ``policy`` bundle was compiled with."""
    plan = CLI_PLAN if policy == "uniform" else plan_budget(None, 4, 36, stages=STAGES)
    return PruneConfig(plan=plan, kv_policy=policy)


def _feeds(model, batch, seed=0, layout=None):
    ids = prompt_ids(model, layout or LAYOUTS[batch])
    pixels = torch.randn(batch, 3, 48, 48, generator=torch.Generator().manual_seed(seed))
    return ids, pixels


@pytest.mark.parametrize("policy", ["uniform", "per-layer"])
def test_greedy_generation_equals_reference(tiny_llava, bundles, policy):
    engine = Engine.load(bundles[policy])
    ids, pixels = _feeds(tiny_llava, 2, layout=CLI_LAYOUT if policy == "uniform" else None)
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy()), "pixel_values": pixels.numpy()}
    generated, timings = engine.generate_ids(feeds, max_new_tokens=16)
    expected = reference_generate(tiny_llava, _prune(policy), ids, pixels, max_new_tokens=16)
    assert generated == expected.tolist()
    # The KV cache the engine actually holds after prefill is the manifest's figure.
    assert timings.kv_cache_bytes == engine.manifest.kv_cache_bytes.pruned
    assert timings.prefill_ms > 0 and timings.decode_ms_per_token > 0


@pytest.mark.parametrize("policy", ["uniform", "per-layer"])
def test_left_padded_prompts_from_the_processor_equal_reference(tiny_llava, bundles, policy):
    """Engine.encode left-pads short prompts; the padded rows still match the reference under both KV policies
    (per-layer: every layer's cache has its own length, and its padding sits at the front of each)."""
    engine = Engine.load(bundles[policy])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 50, 3), dtype=np.uint8))
    feeds = engine.encode([image, image], ["describe ?", "how many red star ?"])
    assert feeds["attention_mask"][0].sum() < feeds["attention_mask"][1].sum() <= feeds["input_ids"].shape[1]
    generated, _ = engine.generate_ids(feeds, max_new_tokens=16)
    expected = reference_generate(
        tiny_llava,
        _prune(policy),
        *(torch.from_numpy(feeds[k]) for k in ("input_ids", "pixel_values", "attention_mask")),
    )
    assert generated == expected.tolist()


@pytest.mark.parametrize("policy", ["uniform", "per-layer"])
def test_in_graph_decode_equals_the_portable_decode_step(tiny_llava, bundles, policy, tmp_path):
    """The bundle's decode step (ONNX Runtime's GroupQueryAttention, writing the KV buffers it is bound to in place)
    against the portable one (the runtime writes the new keys and values) on the same bundle and left-padded rows
    of different lengths: same greedy tokens, same logits, under either KV policy (equal or per-layer lengths)."""
    import onnx

    engine = Engine.load(bundles[policy])
    decode = onnx.load(str(bundles[policy] / "decode.onnx"), load_external_data=False).graph
    assert {node.op_type for node in decode.node if node.domain} == {"GroupQueryAttention"}
    assert [o.name for o in decode.output][1:3] == ["present.0.key", "present.0.value"]
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (60, 50, 3), dtype=np.uint8))
    feeds = engine.encode([image, image], ["describe ?", "how many red star ?"])
    portable = assert_decodes_like_portable(engine, tiny_llava, tmp_path, feeds, steps=12, bound=1e-4)
    assert engine.generate_ids(feeds, 12)[0] == portable  # float32: the same greedy tokens


def test_pruning_disabled_equals_transformers_generate(tiny_llava, bundles):
    engine = Engine.load(bundles[UNPRUNED])
    ids, pixels = _feeds(tiny_llava, 1)
    eos = tiny_llava.generation_config.eos_token_id
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy()), "pixel_values": pixels.numpy()}
    generated, _ = engine.generate_ids(feeds, max_new_tokens=16, stops={eos})
    with torch.no_grad():
        hf = tiny_llava.generate(
            input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False
        )[0, ids.shape[1] :].tolist()
    hf = hf[: hf.index(eos) + 1] if eos in hf else hf
    assert generated == [hf]


def test_generate_api_batches_any_number_of_prompts(bundles):
    engine = Engine.load(bundles["uniform"])
    image = Image.new("RGB", (30, 40), "red")
    prompts = ["what is the colour of shape ?", "describe", "how many circle ?"]
    results = engine.generate([image] * 3, prompts, max_new_tokens=5)
    assert len(results) == 3 and all(1 <= len(r.token_ids) <= 5 and isinstance(r.text, str) for r in results)
    # The odd prompt out ran in a padded chunk; alone it answers the same.
    assert engine.generate([image], prompts[2:], max_new_tokens=5)[0].token_ids == results[2].token_ids
    sampling = SamplingConfig(do_sample=True, top_k=5, seed=3)
    sampled = engine.generate([image], prompts[:1], max_new_tokens=5, sampling=sampling)
    again = engine.generate([image], prompts[:1], max_new_tokens=5, sampling=sampling)
    assert sampled[0].token_ids == again[0].token_ids
    # A stop token ends the answer, and is kept as its last id.
    first = results[0].token_ids[0]
    stopped = engine.generate([image], prompts[:1], max_new_tokens=5, stop_token_ids=[first])
    assert stopped[0].token_ids == [first]


def test_llava15_uniform_kv_ratio():
    """Uniform policy at LLaVA-1.5 geometry, plan 192: every layer keeps text + 62 visual tokens."""
    plan = plan_budget(192, 32, 576)
    text = 50
    vicuna = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32)
    pruned = kv_cache_bytes(vicuna, kv_cache_tokens(plan, text, "uniform"), 1, 2)
    unpruned = kv_cache_bytes(vicuna, kv_cache_tokens(plan, text, "unpruned"), 1, 2)
    assert pruned == 2 * 32 * 32 * (text + 62) * 128 * 2
    assert unpruned / pruned == pytest.approx((text + 576) / (text + 62))  # 5.59x at 50 text tokens (paper: 5.59x)


def test_bad_input(tiny_llava, bundles, tmp_path):
    bundle = bundles[UNPRUNED]
    engine = Engine.load(bundle)
    image = Image.new("RGB", (30, 40))
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate([image], ["  "])
    with pytest.raises(ValueError, match="compiled for at most 8; shorten it or recompile with --text-len"):
        engine.generate([image], ["what is the colour of the red circle left of the blue square ?"])
    with pytest.raises(ValueError, match="no chat template"):
        engine.generate([image], ["what"], chat=True)
    with pytest.raises(ValueError, match=r"runs past the model's 4096 positions .* ask for at most 4052"):
        engine.generate([image], ["what"], max_new_tokens=5000)
    with pytest.raises(TypeError, match="sampling must be a SamplingConfig, got bool"):
        engine.generate([image], ["what"], 4, True)  # the old positional do_sample
    ids, pixels = _feeds(tiny_llava, 2)
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy()), "pixel_values": pixels.numpy()}
    with pytest.raises(ValueError, match=r"input_ids has shape \[2, 44\] but the bundle was compiled for \[1, 44\]"):
        engine.generate_ids(feeds, 4)
    with pytest.raises(ValueError, match=r"pixel_values has shape \[1, 3, 40, 40\] but prefill.onnx was compiled"):
        engine.generate_ids(
            {
                "input_ids": ids[:1].numpy(),
                "attention_mask": feeds["attention_mask"][:1],
                "pixel_values": np.zeros((1, 3, 40, 40), np.float32),
            },
            4,
        )
    one = {"input_ids": ids[:1].numpy(), "attention_mask": feeds["attention_mask"][:1], "pixel_values": pixels.numpy()}
    vocab = engine.manifest.vocab_size()
    for bad_id in (-1, vocab):  # ONNX Runtime wraps -1 to a real token; an AOTInductor package aborts on either
        bad = dict(one, input_ids=one["input_ids"].copy())
        bad["input_ids"][0, -1] = bad_id
        with pytest.raises(ValueError, match=rf"token id {bad_id}, outside the model's vocabulary \[0, {vocab}\)"):
            engine.generate_ids(bad, 4)
    for value in (np.nan, np.inf):
        bad = dict(one, pixel_values=one["pixel_values"].copy())
        bad["pixel_values"][0, 0, 0, 0] = value
        with pytest.raises(ValueError, match="pixel_values holds NaN or infinite values"):
            engine.generate_ids(bad, 4)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Engine.load(tmp_path / "nope")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in bundle.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "decode.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="decode.onnx is missing"):
        Engine.load(broken)
    (broken / "decode.onnx").write_bytes(b"not a graph")
    with pytest.raises(ValueError, match="decode.onnx does not match its manifest hash"):
        Engine.load(broken)
    (broken / "manifest.json").write_text("{ truncated")
    with pytest.raises(ValueError, match="manifest.json is corrupted"):
        Engine.load(broken)


def test_clse_run_cli(bundles, tmp_path, capsys):
    image = tmp_path / "img.png"
    Image.new("RGB", (20, 20), "blue").save(image)
    bundle = str(bundles[UNPRUNED])
    assert run_main([bundle, "--image", str(image), "--prompt", "what", "--max-new-tokens", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["results"][0]
    assert 1 <= len(result["token_ids"]) <= 4 and {"prefill_ms", "decode_ms_per_token", "kv_cache_bytes"} <= set(
        result["timings"]
    )
    assert run_main([bundle, "--image", str(image), "--prompt", "what", "--max-new-tokens", "4"]) == 0
    assert "ms/token" in capsys.readouterr().out
    assert run_main([bundle, "--image", str(tmp_path / "missing.png"), "--prompt", "what"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read image") and len(err.strip().splitlines()) == 1
    for flags, message in (
        (["--sample", "--temperature", "0"], "temperature must be > 0 when sampling"),
        (["--sample", "--temperature", "1e309"], "temperature must be a finite number"),
        (["--sample", "--top-k", "-1"], "top_k must be >= 0"),
        (["--sample", "--seed", "-2"], "seed must be a non-negative integer"),
    ):
        assert run_main([bundle, "--image", str(image), "--prompt", "what", *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, (flags, err)
    sampled = [bundle, "--image", str(image), "--prompt", "what", "--max-new-tokens", "4", "--json"]
    sampled += ["--sample", "--top-k", "5", "--seed", "3"]
    assert run_main(sampled) == 0
    answer = json.loads(capsys.readouterr().out)["results"][0]["token_ids"]
    sampling = SamplingConfig(do_sample=True, top_k=5, seed=3)  # the flags reach the engine as this config
    rgb = Image.open(image).convert("RGB")
    assert answer == Engine.load(bundle).generate([rgb], ["what"], max_new_tokens=4, sampling=sampling)[0].token_ids
