import logging
import re

import pytest
import torch

from lightning_fisher.pruning.patterns import (
    Pattern,
    check_layer_floors,
    layer_floor,
    lowest_k,
    nm_eligible,
    nm_groups_held,
    nm_mask,
    nm_masks,
    parse_pattern,
    to_reduction_layout,
    unstructured_masks,
    validate_min_layer_density,
)


@pytest.mark.parametrize(("text", "expected"), [("unstructured", Pattern()), ("2:4", Pattern(2, 4)), (" 1 : 8 ", Pattern(1, 8)), ("3:5", Pattern(3, 5))])
def test_parse_pattern(text, expected):
    assert parse_pattern(text) == expected


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("4:4", r"pattern='4:4': N must be smaller than M"),
        ("5:4", r"pattern='5:4': N must be smaller than M"),
        ("0:4", r"pattern='0:4': N and M must be at least 1"),
        ("2:0", r"pattern='2:0': N and M must be at least 1"),
        ("-1:4", r"pattern='-1:4': N and M must be at least 1"),
        ("2-4", r"pattern='2-4': must be 'unstructured' or 'N:M'"),
        ("2:4:8", r"pattern='2:4:8': must be"),
        ("dense", r"pattern='dense': must be"),
        ("", r"pattern='': must be"),
    ],
)
def test_parse_pattern_errors(text, match):
    with pytest.raises(ValueError, match=match):
        parse_pattern(text)


def test_weights_1_to_8_under_2_4_by_hand():
    mask = nm_mask(torch.arange(1.0, 9.0).reshape(1, 8), 2, 4)
    assert mask.tolist() == [[False, False, True, True, False, False, True, True]]
    # 1:4 keeps only the largest of each group; groups run along each row
    mask = nm_mask(torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 5.0, 2.0, 3.0]]), 1, 4)
    assert mask.tolist() == [[True, False, False, False], [False, True, False, False]]


def test_conv_groups_run_along_input_channels_at_each_kernel_position():
    # weight [out=1, in=4, kh=1, kw=2]: kernel position 0 holds in-channel scores 1,2,3,4 and
    # position 1 holds 40,30,20,10. Along input channels: keep channels 2,3 at kw=0 and 0,1 at kw=1.
    # (Grouping the flat [in, kh, kw] order instead would group 1,40,2,30 and keep 40,30.)
    scores = torch.zeros(1, 4, 1, 2)
    scores[0, :, 0, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    scores[0, :, 0, 1] = torch.tensor([40.0, 30.0, 20.0, 10.0])
    mask = nm_mask(scores, 2, 4)
    assert mask[0, :, 0, 0].tolist() == [False, False, True, True]
    assert mask[0, :, 0, 1].tolist() == [True, True, False, False]
    assert to_reduction_layout(scores).shape == (1, 1, 2, 4)


def test_nm_mask_keeps_exactly_n_of_every_m_on_random_weights():
    torch.manual_seed(0)
    for shape, (n, m) in [((16, 32), (2, 4)), ((8, 16, 3, 3), (2, 4)), ((4, 24, 1, 1), (3, 8))]:
        mask = nm_mask(torch.randn(shape), n, m)
        groups = to_reduction_layout(mask).reshape(-1, m)
        assert (groups.sum(1) == n).all()
        assert nm_groups_held(mask, n, m).all()


def test_nm_eligibility_and_error_for_ineligible_shapes():
    assert nm_eligible((8, 16, 3, 3), 4) and not nm_eligible((8, 3, 3, 3), 4) and not nm_eligible((8,), 4)
    with pytest.raises(ValueError, match=r"shape \(8, 3, 3, 3\) cannot hold an N:M pattern with M=4"):
        nm_mask(torch.zeros(8, 3, 3, 3), 2, 4)


def test_lowest_k_breaks_ties_by_position():
    values = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 2.0])
    assert lowest_k(values, 3).tolist() == [True, True, False, False, True, False]
    assert lowest_k(torch.ones(5), 2).tolist() == [True, True, False, False, False]
    assert not lowest_k(values, 0).any() and lowest_k(values, 9).all()


def test_unstructured_layer_scope_exact_count_per_layer():
    torch.manual_seed(0)
    scores = {"a": torch.rand(7, 9), "b": torch.rand(33), "c": torch.rand(2, 3, 5)}
    masks = {k: torch.ones_like(v, dtype=torch.bool) for k, v in scores.items()}
    new = unstructured_masks(scores, masks, 0.6, "layer")
    for name, s in scores.items():
        assert int((~new[name]).sum()) == round(0.6 * s.numel())
        # pruned ones are the lowest
        assert s[~new[name]].max() <= s[new[name]].min()


def test_unstructured_global_scope_exact_total_and_one_threshold():
    torch.manual_seed(0)
    scores = {"a": torch.rand(50) * 10, "b": torch.rand(30)}
    masks = {k: torch.ones_like(v, dtype=torch.bool) for k, v in scores.items()}
    # guard off: one threshold empties layer b here (the layer-collapse guard is tested below)
    new = unstructured_masks(scores, masks, 0.5, "global", min_layer_density=0)
    assert sum(int((~m).sum()) for m in new.values()) == 40
    pruned = torch.cat([scores[k][~new[k]] for k in scores])
    kept = torch.cat([scores[k][new[k]] for k in scores])
    assert pruned.max() <= kept.min()
    assert int((~new["b"]).sum()) > int((~new["a"]).sum())  # the low-scored layer loses more


def test_unstructured_masks_are_monotone():
    scores = {"a": torch.tensor([5.0, 1.0, 2.0, 3.0])}
    old = {"a": torch.tensor([False, True, True, True])}  # the highest score was pruned earlier
    new = unstructured_masks(scores, old, 0.5, "layer")
    assert new["a"].tolist() == [False, False, True, True]
    # a lower target never un-prunes
    assert unstructured_masks(scores, new, 0.25, "layer")["a"].tolist() == [False, False, True, True]


def test_nm_masks_convert_cheapest_groups_first_and_keep_held_groups():
    # two rows of one group each: group cost = the two lowest scores; row 1 is cheaper
    scores = {"w": torch.tensor([[9.0, 8.0, 7.0, 6.0], [4.0, 0.1, 3.0, 0.2]])}
    masks = {"w": torch.ones(2, 4, dtype=torch.bool)}
    half = nm_masks(scores, masks, 2, 4, 0.5, "layer")
    assert half["w"].tolist() == [[True, True, True, True], [True, False, True, False]]
    # even if the held group's remaining scores become the highest, it stays converted
    scores = {"w": torch.tensor([[0.0, 0.1, 0.2, 0.3], [40.0, 0.1, 30.0, 0.2]])}
    again = nm_masks(scores, half, 2, 4, 0.5, "layer")
    assert again["w"].tolist() == half["w"].tolist()
    full = nm_masks(scores, half, 2, 4, 1.0, "layer")
    assert full["w"].tolist() == [[False, False, True, True], [True, False, True, False]]


def test_nm_masks_global_ranks_groups_across_layers():
    scores = {
        "a": torch.tensor([[5.0, 5.0, 5.0, 5.0], [6.0, 6.0, 6.0, 6.0]]),
        "b": torch.tensor([[1.0, 1.0, 9.0, 9.0], [7.0, 7.0, 7.0, 7.0]]),
    }
    masks = {k: torch.ones_like(v, dtype=torch.bool) for k, v in scores.items()}
    # 4 groups, fraction 1/4 → the single cheapest group overall (cost 2, in layer b)
    new = nm_masks(scores, masks, 2, 4, 0.25, "global")
    assert new["a"].all() and new["b"].tolist() == [[False, False, True, True], [True] * 4]
    # per layer: one group of each layer; in a, the cheaper first row (ties in a row: lower index pruned last)
    per_layer = nm_masks(scores, masks, 2, 4, 0.5, "layer")
    assert per_layer["a"].tolist() == [[True, True, False, False], [True] * 4]
    assert per_layer["b"].tolist() == new["b"].tolist()


# ---------------------------------------------------------------- layer-collapse guard (min_layer_density)


def _collapsing_scores() -> dict[str, torch.Tensor]:
    """Layer b (150 weights) holds all the lowest scores, in shuffled order; a (200) all the highest."""
    generator = torch.Generator().manual_seed(0)
    return {
        "a": (1000.0 + torch.randperm(200, generator=generator).float()).reshape(20, 10),
        "b": torch.randperm(150, generator=generator).float().reshape(10, 15),
    }


def _all_kept(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.ones_like(v, dtype=torch.bool) for k, v in scores.items()}


def _old_global(scores: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Reference of the unguarded global scope: a stable sort of (score, position), pruned ones first."""
    names = list(scores)
    flat = torch.cat([torch.where(masks[n], scores[n].float(), float("-inf")).flatten() for n in names])
    already = sum(int((~masks[n]).sum()) for n in names)
    k = max(round(sparsity * flat.numel()), already)
    pruned = torch.zeros(flat.numel(), dtype=torch.bool)
    pruned[torch.sort(flat, stable=True).indices[:k]] = True
    out, offset = {}, 0
    for n in names:
        out[n] = ~pruned[offset : offset + scores[n].numel()].reshape(scores[n].shape) & masks[n]
        offset += scores[n].numel()
    return out


@pytest.mark.parametrize(("density", "floor_b"), [(0.01, 2), (0.05, 8), (0.1, 15)])  # ceil(d·150)
def test_guard_keeps_the_top_scoring_floor_of_a_collapsing_layer(density, floor_b):
    scores = _collapsing_scores()
    masks = _all_kept(scores)
    # without the guard one threshold removes all of b (175 to prune, b has the 150 lowest scores)
    assert not unstructured_masks(scores, masks, 0.5, "global", min_layer_density=0)["b"].any()
    new = unstructured_masks(scores, masks, 0.5, "global", min_layer_density=density)
    assert int(new["b"].sum()) == floor_b
    assert sorted(scores["b"][new["b"]].tolist()) == list(range(150 - floor_b, 150))  # b's highest scores
    assert sum(int((~m).sum()) for m in new.values()) == round(0.5 * 350)
    # the threshold over the rest is still global: a loses its lowest 175 − (150 − floor_b)
    assert sorted(scores["a"][~new["a"]].tolist()) == [1000.0 + i for i in range(175 - 150 + floor_b)]


def test_guard_floor_rounds_up_and_is_at_least_one():
    assert [layer_floor(n, d) for n, d in [(100, 0.07), (147456, 0.01), (10, 0.01), (200, 0.05), (10, 0.0)]] == [
        7,  # 0.07 * 100 = 7.000000000000001 in floats: the noise does not add a weight
        1475,  # ceil(1474.56)
        1,
        10,
        0,
    ]


def test_guard_zero_reproduces_the_unguarded_masks_bit_exactly():
    torch.manual_seed(1)
    # integer scores: many ties, so the position tie-break matters; one layer partly pruned already
    scores = {"a": torch.randint(0, 5, (13, 7)).float(), "b": torch.randint(0, 3, (40,)).float(), "c": torch.randint(0, 9, (3, 3, 4)).float()}
    masks = _all_kept(scores)
    masks["b"] = torch.rand(40) > 0.3
    for sparsity in (0.3, 0.7, 0.95):
        reference = _old_global(scores, masks, sparsity)
        guard_off = unstructured_masks(scores, masks, sparsity, "global", min_layer_density=0.0)
        assert all(torch.equal(guard_off[n], reference[n]) for n in scores), sparsity
    # where no layer falls below its floor the default guard changes nothing either (survivors of a, b, c:
    # 67/22/28 at 0.3, 47/11/25 at 0.5); at 0.7 the unguarded masks empty b (26/0/24), the guard keeps 1
    for sparsity in (0.3, 0.5):
        reference = _old_global(scores, masks, sparsity)
        assert all(int(reference[n].sum()) >= layer_floor(scores[n].numel(), 0.01) for n in scores)
        default = unstructured_masks(scores, masks, sparsity, "global")
        assert all(torch.equal(default[n], reference[n]) for n in scores), sparsity
    assert int(_old_global(scores, masks, 0.7)["b"].sum()) == 0
    assert int(unstructured_masks(scores, masks, 0.7, "global")["b"].sum()) == 1


def test_guard_and_the_old_masks_coincide_on_the_collapsing_case_only_with_guard_off():
    scores = _collapsing_scores()
    masks = _all_kept(scores)
    reference = _old_global(scores, masks, 0.5)
    off = unstructured_masks(scores, masks, 0.5, "global", min_layer_density=0)
    on = unstructured_masks(scores, masks, 0.5, "global")
    assert all(torch.equal(off[n], reference[n]) for n in scores)
    assert not torch.equal(on["b"], reference["b"])


def test_guard_is_monotone_and_keeps_a_layer_already_below_its_floor():
    scores = _collapsing_scores()
    first = unstructured_masks(scores, _all_kept(scores), 0.3, "global", min_layer_density=0.05)
    second = unstructured_masks(scores, first, 0.5, "global", min_layer_density=0.05)
    for name in scores:
        assert not (second[name] & ~first[name]).any()  # nothing un-pruned
    assert int(second["b"].sum()) == 8 and sum(int((~m).sum()) for m in second.values()) == 175
    # b was emptied down to 3 survivors by an unguarded prune: it keeps those 3, it is not refilled to 8
    below = unstructured_masks(scores, _all_kept(scores), 147 / 350, "global", min_layer_density=0)
    assert int(below["b"].sum()) == 3
    third = unstructured_masks(scores, below, 0.5, "global", min_layer_density=0.05)
    assert torch.equal(third["b"], below["b"])
    assert not (third["a"] & ~below["a"]).any()
    assert sum(int((~m).sum()) for m in third.values()) == 175


def test_guard_infeasible_floors_are_an_error():
    scores = _collapsing_scores()
    # floors 100 + 75 = 175 > 350 − round(0.6·350) = 140
    with pytest.raises(ValueError, match=r"min_layer_density=0.5: the per-layer floors keep 175 of 350 weights.*prunes 210 and leaves only 140"):
        unstructured_masks(scores, _all_kept(scores), 0.6, "global", min_layer_density=0.5)
    with pytest.raises(ValueError, match=r"min_layer_density=0.5: the per-layer floors keep 175 of 350 weights"):
        check_layer_floors({"a": 200, "b": 150}, 0.6, 0.5)
    check_layer_floors({"a": 200, "b": 150}, 0.5, 0.5)  # exactly reachable: 175 kept, 175 pruned
    assert sum(int((~m).sum()) for m in unstructured_masks(scores, _all_kept(scores), 0.5, "global", min_layer_density=0.5).values()) == 175


def test_guard_does_not_apply_to_layer_scope():
    scores = _collapsing_scores()
    masks = _all_kept(scores)
    guarded = unstructured_masks(scores, masks, 0.9, "layer", min_layer_density=0.5)  # would be infeasible globally
    plain = unstructured_masks(scores, masks, 0.9, "layer", min_layer_density=0)
    assert all(torch.equal(guarded[n], plain[n]) for n in scores)


def test_guard_logs_the_layers_held_at_their_floor(caplog):
    scores = _collapsing_scores()
    with caplog.at_level(logging.INFO, logger="lightning_fisher.pruning.patterns"):
        unstructured_masks(scores, _all_kept(scores), 0.3, "global", min_layer_density=0.05)  # nothing held
        assert not caplog.records
        unstructured_masks(scores, _all_kept(scores), 0.5, "global", min_layer_density=0.05)
    (record,) = caplog.records
    assert record.getMessage() == (
        "global pruning to sparsity=0.5: layers held at their min_layer_density=0.05 floor (kept/numel): b (8/150)"
    )


@pytest.mark.parametrize("value", [-0.01, 1.0, 1.5, float("nan"), "0.1", True, None])
def test_guard_rejects_bad_densities(value):
    with pytest.raises(ValueError, match=re.escape(f"min_layer_density={value!r}: must be a float in [0, 1)")):
        validate_min_layer_density(value)
    scores = _collapsing_scores()
    with pytest.raises(ValueError, match=re.escape(f"min_layer_density={value!r}:")):
        unstructured_masks(scores, _all_kept(scores), 0.5, "global", min_layer_density=value)
