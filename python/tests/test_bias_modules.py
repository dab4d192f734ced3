"""The bias modules: golden values from the papers' definitions (the C++ tests' literals in
tests/bias/), the HF T5 checkpoint layout, construction from known values, project(), and
materialize() against the tests' own formulas (reference.py)."""

import math

import pytest
import torch

import relbias
from relbias import _relbias
from conftest import KINDS, make_bias
from reference import bias_matrix, hf_t5_bucket


def one_cell(module, i, j, h=0):
    return module.materialize(1, 1, i, j)[h, 0, 0].item()


def test_golden_values():
    assert one_cell(relbias.ALiBi(8).double(), 5, 2) == -1.5  # slope 1/2 for head 0 of 8
    assert relbias.ALiBi(3).slopes.tolist() == [1 / 16, 1 / 256, 1 / 4]  # the authors' interleaving
    assert one_cell(relbias.KerplePower(1, r1=[0.5], r2=[2.0]).double(), 5, 2) == pytest.approx(-4.5, abs=1e-15)
    assert one_cell(relbias.KerpleLog(1, r1=[2.0], r2=[1.0]).double(), 4, 1) == pytest.approx(-2.772588722239781, abs=1e-15)
    assert one_cell(relbias.Sandwich(8, 64), 5, 2) == pytest.approx(-4.42297900107037, abs=1e-6)
    assert relbias.Sandwich(8, 64).materialize(1, 1, 5, 2, dtype=torch.float64)[0, 0, 0].item() == pytest.approx(
        -4.42297900107037, rel=1e-14)
    # FIRE, hand-set weights of tests/bias/test_fire.cpp (mpmath goldens): (i, j) -> (head 0, head 1)
    fire = relbias.FIRE(2, weights={"W1": [1, -1], "b1": [0, 0.5], "W2": [[1, 2], [-1, 0.5]], "b2": [0.25, -0.5], "c": 0.25,
                                    "L_multiplier": 1.0}).double()
    for i, j, h0, h1 in [(100, 93, 1.0418436722754478032, -0.56223449158682829522),
                         (600, 500, 0.89937495906443826435, -1.1493749590644382643),
                         (5000, 4999, 1.2187110272962691629, -0.29693345905559625559)]:
        assert one_cell(fire, i, j, 0) == pytest.approx(h0, rel=1e-13)
        assert one_cell(fire, i, j, 1) == pytest.approx(h1, rel=1e-13)


def test_t5_buckets_match_hf_and_cpp():
    # tests/bias/test_t5.cpp: HF relative position (key - query) -> bucket
    for rp, bidirectional, bucket in [(16, True, 26), (-90, True, 14), (-91, True, 15), (-112, False, 30), (-113, False, 31),
                                      (5, True, 21), (-5, True, 5), (5, False, 0)]:
        assert _relbias.t5_bucket(rp, bidirectional, 32, 128) == bucket
        assert hf_t5_bucket(torch.tensor(rp), bidirectional, 32, 128).item() == bucket
        assert relbias.bias.t5_relative_position_bucket(torch.tensor(rp), bidirectional).item() == bucket


def test_t5_loads_an_hf_checkpoint_table():
    weight = torch.randn(32, 8)  # HF: relative_attention_bias = nn.Embedding(num_buckets, n_heads)
    bias = relbias.T5Bias.from_pretrained(weight, causal=False)
    assert bias.heads == 8 and bias.num_buckets == 32
    assert torch.equal(bias.relative_attention_bias.weight, weight)
    state = {"relative_attention_bias.weight": weight * 2}  # the state-dict key HF uses
    bias.load_state_dict(state)
    b = bias.materialize(5, 40)
    buckets = hf_t5_bucket(torch.arange(40).view(1, -1) - torch.arange(5).view(-1, 1), True, 32, 128)
    assert torch.equal(b, (weight * 2)[buckets].permute(2, 0, 1))


@pytest.mark.parametrize("kind", KINDS)
def test_materialize_matches_the_formulas(kind):
    for causal in (False, True):
        bias = make_bias(kind, 3, causal)
        extra = {"dtype": torch.float64} if kind in ("none", "sandwich") else {}  # no parameters to carry a dtype
        torch.testing.assert_close(bias.materialize(9, 14, 3, 0, **extra), bias_matrix(bias, 9, 14, 3, 0), atol=1e-12, rtol=0)


def test_initial_values_are_the_cpp_policies():
    kp = relbias.KerplePower(4, seed=7)
    assert (kp.r1 >= 1e-2).all() and (kp.r2 >= 1e-2).all() and (kp.r2 <= 2).all()
    assert torch.equal(relbias.KerplePower(4, seed=7).r1, kp.r1) and not torch.equal(relbias.KerplePower(4, seed=8).r1, kp.r1)
    fire = relbias.FIRE(3, seed=1)
    assert fire.c.item() == pytest.approx(0.1) and fire.L_multiplier.item() == 1.0 and fire.W2.shape == (3, 32)
    assert relbias.ALiBi(4, max_bias=4.0).slopes.tolist() != relbias.ALiBi(4).slopes.tolist()  # ggml's formula
    t5 = relbias.T5Bias(2, True)
    assert t5.relative_attention_bias.weight.abs().max() == 0  # zero until reset_parameters, as in C++
    t5.reset_parameters(seed=0, d_model=64)
    assert 0.01 < t5.relative_attention_bias.weight.std().item() < 0.3


def test_kerple_project_and_rejected_values():
    bias = relbias.KerplePower(2, r1=[0.5, 1.0], r2=[1.0, 1.5])
    with torch.no_grad():
        bias.r1[0] = -3.0
        bias.r2[1] = 7.0
    with pytest.raises(ValueError, match="r1"):
        bias.check()
    bias.project()
    assert bias.r1.tolist() == [pytest.approx(1e-2), 1.0] and bias.r2.tolist() == [1.0, 2.0]
    bias.check()
    log = relbias.KerpleLog(1, r1=[1.0], r2=[50.0])
    log.project()
    assert log.r2.item() == 50.0  # no upper clamp for log
    with pytest.raises(ValueError, match="r2"):
        relbias.KerpleLog(1, r1=[1.0], r2=[0.0])


def test_module_argument_errors():
    with pytest.raises(ValueError, match="heads must be >= 1"):
        relbias.ALiBi(0)
    with pytest.raises(ValueError, match="num_buckets"):
        relbias.T5Bias(2, False, num_buckets=2)
    with pytest.raises(ValueError, match="even"):
        relbias.Sandwich(2, 5)
    with pytest.raises(ValueError, match="clip"):
        relbias.PerOffset(2, True, -1)
    with pytest.raises(ValueError, match="slopes"):
        relbias.ALiBi(2, slopes=[1.0])


def test_parameters_are_registered():
    assert len(list(relbias.ALiBi(2).parameters())) == 0 and len(list(relbias.ALiBi(2, trainable=True).parameters())) == 1
    assert sum(p.numel() for p in relbias.FIRE(4, width=8).parameters()) == 8 + 8 + 32 + 4 + 2
    assert [n for n, _ in relbias.KerpleLog(2).named_parameters()] == ["r1", "r2"]
    assert sum(p.numel() for p in relbias.PerOffset(2, False, 3).parameters()) == 14
