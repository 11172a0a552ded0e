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
