import pytest
import torch

from lightning_fisher.pruning.patterns import (
    Pattern,
    lowest_k,
    nm_eligible,
    nm_groups_held,
    nm_mask,
    nm_masks,
    parse_pattern,
    to_reduction_layout,
    unstructured_masks,
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
    new = unstructured_masks(scores, masks, 0.5, "global")
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
