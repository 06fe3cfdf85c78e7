import pytest

from clse_fx.plan import LAYER0_SCORES, QWEN2_VL_SCHEDULE, SCORE_TYPES, PruneConfig, parse_stages, plan_budget


@pytest.mark.parametrize(
    ("keep", "expected"),
    [(192, [330, 210, 62]), (128, [220, 140, 41]), (64, [110, 70, 20]), (100, [172, 109, 32]), (32, [55, 35, 10])],
)
def test_llava_table(keep, expected):
    plan = plan_budget(keep, num_layers=32, num_visual=576)
    assert plan.stages == tuple(zip([1, 11, 21], expected))


def test_llava_ratio_budget_maps_to_count_table():
    assert plan_budget(1 / 3, 32, 576).stages == plan_budget(192, 32, 576).stages


@pytest.mark.parametrize(
    ("ratio", "expected"),
    [
        (0.334, (0.57, 0.36, 0.098)),
        (0.223, (0.38, 0.24, 0.066)),
        (0.112, (0.19, 0.12, 0.034)),
        (0.2, (0.342, 0.216, 0.0588)),
    ],
)
def test_qwen2_vl_ratio_table(ratio, expected):
    plan = plan_budget(ratio, num_layers=28, num_visual=1000, schedule=QWEN2_VL_SCHEDULE)
    assert plan.stages == tuple(zip([1, 10, 19], [int(1000 * r) for r in expected]))


def test_qwen2_vl_ratios_floor_as_the_published_code():
    """The official Qwen2-VL code keeps max(1, int(num_visual * ratio)) per stage; rounding kept one more here."""
    assert plan_budget(0.334, 28, 256, schedule=QWEN2_VL_SCHEDULE).stages == ((1, 145), (10, 92), (19, 25))
    assert plan_budget(0.112, 28, 576, schedule=QWEN2_VL_SCHEDULE).stages == ((1, 109), (10, 69), (19, 19))
    assert plan_budget(0.2, 28, 10, schedule=QWEN2_VL_SCHEDULE).stages[-1] == (19, 1)  # at least one token


def test_qwen2_vl_count_budget_is_converted_to_ratio():
    assert plan_budget(334, 28, 1000, schedule=QWEN2_VL_SCHEDULE).stages == ((1, 570), (10, 360), (19, 98))


def test_average_visual_tokens_per_layer():
    plan = plan_budget(192, 32, 576)
    # layer 0 sees all 576; 10 layers at 330, 10 at 210, 11 at 62
    assert plan.avg_visual_tokens == pytest.approx((576 + 3300 + 2100 + 682) / 32)
    assert plan.visual_tokens_per_layer()[:2] == [576, 330]
    single = plan_budget(None, 4, 36, stages="2:9")
    assert single.avg_visual_tokens == pytest.approx((36 * 2 + 9 * 2) / 4)
    assert "layer 2: 9" in single.describe()


@pytest.mark.parametrize(("depth", "layers"), [(32, [1, 11, 21]), (16, [1, 6, 10]), (4, [1, 2, 3]), (64, [2, 22, 42])])
def test_stages_scale_to_other_depths(depth, layers):
    assert [layer for layer, _ in plan_budget(64, depth, 576).stages] == layers


def test_budget_equal_to_visual_count_is_noop():
    plan = plan_budget(36, 4, 36)
    assert plan.is_noop and plan.avg_visual_tokens == 36
    assert not plan_budget(12, 4, 36).is_noop


def test_explicit_stages():
    assert parse_stages("1:330, 11:210,21:62") == [(1, 330), (11, 210), (21, 62)]
    assert plan_budget(None, 32, 576, stages="1:330,11:210,21:62").stages == ((1, 330), (11, 210), (21, 62))
    assert plan_budget(None, 32, 576, stages=[(5, 100)]).stages == ((5, 100),)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(keep=0), "at least 1"),
        (dict(keep=0.0001), "at least 1"),
        (dict(keep=577), "use a budget <= 576"),
        (dict(keep=12.5), "neither a token count nor a ratio"),
        (dict(keep=None), "give a budget"),
        (dict(keep=None, stages="11:100,1:200"), "must increase"),
        (dict(keep=None, stages="1:100,1:50"), "must increase"),
        (dict(keep=None, stages="32:10"), "out of range: use 0..31"),
        (dict(keep=None, stages="-1:10"), "out of range: use 0..31"),
        (dict(keep=None, stages="0:100,0:50"), "must increase"),
        (dict(keep=None, stages="1:100,11:200"), "must not increase"),
        (dict(keep=None, stages="1:0"), "out of range: use 1..576"),
        (dict(keep=None, stages="1:600"), "out of range: use 1..576"),
        (dict(keep=None, stages="1-100"), "LAYER:KEEP"),
    ],
)
def test_invalid_input_says_what_to_change(kwargs, message):
    keep = kwargs.pop("keep")
    with pytest.raises(ValueError, match=message):
        plan_budget(keep, 32, 576, **kwargs)


def test_too_shallow_for_three_stages():
    with pytest.raises(ValueError, match="pass explicit stages"):
        plan_budget(8, 3, 36)
    assert plan_budget(None, 3, 36, stages="1:8").stages == ((1, 8),)


def test_prune_config_validation():
    plan = plan_budget(8, 4, 36)
    for bad, message in [
        (dict(score="fastv"), "choose one of"),
        (dict(kv_policy="x"), "KV policy"),
        (dict(temp=0), "temp"),
    ]:
        with pytest.raises(ValueError, match=message):
            PruneConfig(plan=plan, **bad)


@pytest.mark.parametrize("score", SCORE_TYPES)
def test_stage_before_layer0_only_for_scores_without_layer_k_minus_1(score):
    plan = plan_budget(None, 4, 36, stages="0:12,2:6")
    if score in LAYER0_SCORES:
        assert PruneConfig(plan=plan, score=score).plan.stages[0] == (0, 12)
    else:
        with pytest.raises(ValueError, match="before layer 0 does not have: start the stages at layer 1"):
            PruneConfig(plan=plan, score=score)


def test_what_a_config_decides_is_checked_before_the_model_loads():
    """check_plan_fits runs plan_budget's checks on the depth and visual-token count config.json gives; what it
    cannot give (None) is left for the loaded model."""
    from clse_fx.plan import check_plan_fits

    with pytest.raises(ValueError, match="exceeds the 256 visual tokens"):
        check_plan_fits(1000, None, 6, 256)
    with pytest.raises(ValueError, match="stage layer 9 is out of range: use 0..5"):
        check_plan_fits(None, "9:10", 6, None)  # any-resolution images: no count, the layers still checked
    check_plan_fits(None, "1:10", 6, None)
    check_plan_fits(1000, None, 6, None)
    check_plan_fits(1000, None, None, None)
