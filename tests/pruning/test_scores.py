import pytest
import torch

from lightning_fisher.pruning.scores import check_finite, score_magnitude, score_obd, score_obs, score_random


def test_scores_by_hand():
    w = torch.tensor([[-2.0, 1.0], [0.5, 0.0]])
    f = torch.tensor([[1.0, 4.0], [8.0, 3.0]])
    torch.testing.assert_close(score_magnitude(w), torch.tensor([[2.0, 1.0], [0.5, 0.0]]))
    # θ²F/2: 4·1/2, 1·4/2, 0.25·8/2, 0
    torch.testing.assert_close(score_obd(w, f), torch.tensor([[2.0, 2.0], [1.0, 0.0]]))
    # θ²/(2Q): with Q = 1/F this equals OBD
    torch.testing.assert_close(score_obs(w, 1 / f), score_obd(w, f))
    # damped: θ²(F + γ)/2 with γ = 1: 4·2/2, 1·5/2, 0.25·9/2, 0; the OBS cost of Q = (F + γ)⁻¹
    torch.testing.assert_close(score_obd(w, f, damping=1.0), torch.tensor([[4.0, 2.5], [1.125, 0.0]]))
    torch.testing.assert_close(score_obs(w, 1 / (f + 1.0)), score_obd(w, f, damping=1.0))


def test_random_scores_follow_the_generator():
    w = torch.zeros(3, 4)
    a = score_random(w, torch.Generator().manual_seed(1))
    b = score_random(w, torch.Generator().manual_seed(1))
    c = score_random(w, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_shape_mismatch_and_non_finite_are_errors():
    with pytest.raises(ValueError, match="fisher_diag has shape"):
        score_obd(torch.zeros(2, 2), torch.zeros(4))
    with pytest.raises(ValueError, match=r"\['a'\] contain NaN"):
        check_finite({"a": torch.tensor([float("nan")]), "b": torch.tensor([1.0])})
