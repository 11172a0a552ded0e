"""NonFiniteGuard: a non-finite step leaves the weights and AdamW's state untouched (fused on the
device, or unfused through a host read), and a run of skips is reported at the next log step."""
import pytest
import torch

from mam2_fast.train.optim import NonFiniteGuard


def _setup(fused):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, 3))
    opt = torch.optim.AdamW([w], lr=0.1, fused=fused)
    return w, opt, NonFiniteGuard(opt, [w], clip_grad=1.0, max_nonfinite=3, device=torch.device("cpu"))


def _grad(w, value=None):
    w.grad = torch.randn_like(w) if value is None else torch.full_like(w, value)


@pytest.mark.parametrize("fused", [True, False])
def test_skip_keeps_weights_and_optimizer_state(fused):
    w, opt, guard = _setup(fused)
    _grad(w)
    guard.step()
    before = w.detach().clone()
    state = {k: v.clone() for k, v in opt.state[w].items()}
    for bad in (float("nan"), float("inf")):
        _grad(w, bad)
        gnorm = guard.step()
        assert not torch.isfinite(gnorm)
        assert torch.equal(w.detach(), before) and w.grad is None
        for k, v in opt.state[w].items():
            assert torch.equal(v, state[k]), k          # step count and moments unchanged
    _grad(w)
    guard.step()
    assert not torch.equal(w.detach(), before)
    assert float(opt.state[w]["step"]) == 2.0
    assert guard.total_skipped() == 2


def test_streak_reported_at_log_step_even_if_it_ended():
    w, opt, guard = _setup(True)
    for v in (float("nan"),) * 3 + (None,):
        guard.micro(torch.tensor(1.0 if v is None else v))
        _grad(w, v)
        guard.step()
    n_ok, skipped, new, err = guard.end_log_window(step=4, last_ckpt="ck")
    assert (n_ok, skipped, new) == (1.0, 3, 3)
    assert isinstance(err, FloatingPointError) and "3 non-finite" in str(err) and "ck" in str(err)
    # the next window starts from the current run (0): no error, nothing new
    _grad(w, float("nan"))
    guard.step()
    n_ok, skipped, new, err = guard.end_log_window(step=5)
    assert (n_ok, skipped, new, err) == (0.0, 4, 1, None)   # no finite loss: the caller logs NaN
    # a run crossing the window boundary counts whole: 1 (before) + 2 (now) = 3
    for _ in range(2):
        _grad(w, float("nan"))
        guard.step()
    assert guard.end_log_window(step=7)[3] is not None


# ---- fp16 loss scaling (train.precision: fp16, and auto on GPUs without native bf16) ----------
def _pair(fused, clip, **kw):
    """Two identical parameters + AdamW: one plain guard, one loss-scaled guard."""
    out = []
    for scaled in (False, True):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(6, 4))
        opt = torch.optim.AdamW([w], lr=0.05, fused=fused)
        out.append((w, NonFiniteGuard(opt, [w], clip_grad=clip, max_nonfinite=3, device=torch.device("cpu"),
                                      loss_scale=scaled, **kw)))
    return out


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("clip", [0.0, 0.3])
def test_scaled_steps_equal_unscaled_steps(fused, clip):
    (w0, g0), (w1, g1) = _pair(fused, clip)
    x = torch.randn(8, 4)
    for _ in range(3):
        for w, g in ((w0, g0), (w1, g1)):
            g.scale_loss((x @ w.T).square().mean()).backward()
            g.step()
    torch.testing.assert_close(w1.detach(), w0.detach(), rtol=1e-5, atol=1e-6)


def test_overflow_halves_the_scale_and_counts_only_at_the_floor():
    (_, _), (w, g) = _pair(True, 0.0, init_scale=4.0)
    before = w.detach().clone()
    for expect_scale, expect_streak in ((2.0, 0), (1.0, 0), (1.0, 1), (1.0, 2)):
        w.grad = torch.full_like(w, float("inf"))
        g.step()
        assert float(g.scale) == expect_scale and int(g.streak) == expect_streak
    assert torch.equal(w.detach(), before) and g.total_skipped() == 4
    w.grad = torch.ones_like(w)
    g.step()
    assert int(g.streak) == 0 and not torch.equal(w.detach(), before)


def test_scale_grows_after_good_steps_and_round_trips_a_checkpoint():
    (_, _), (w, g) = _pair(True, 0.0, init_scale=8.0, growth_interval=3)
    for i in range(7):
        w.grad = torch.randn_like(w)
        g.step()
    assert float(g.scale) == 32.0 and int(g.good_steps) == 1     # doubled after steps 3 and 6
    state = g.scale_state()
    (_, _), (_, g2) = _pair(True, 0.0)
    g2.load_scale_state(state)
    assert float(g2.scale) == 32.0 and int(g2.good_steps) == 1
    assert g2.scale_loss(torch.tensor(2.0)) == 64.0


def test_precision_auto_picks_bf16_only_where_native(monkeypatch):
    from mam2_fast.train import accel
    from mam2_fast.train.loop import amp_dtype

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(accel, "capability", lambda d: (7, 0))      # V100
    assert amp_dtype(cuda, "auto") == torch.float16 and amp_dtype(cuda, "bf16") == torch.bfloat16
    monkeypatch.setattr(accel, "capability", lambda d: (8, 0))      # A100
    assert amp_dtype(cuda, "auto") == torch.bfloat16
    assert amp_dtype(cpu, "auto") is None and amp_dtype(cpu, "fp16") == torch.float16
    assert amp_dtype(cuda, "fp32") is None
