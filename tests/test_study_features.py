"""benchmarks/study_features.py: pooled-feature diagnostics of a study's encoders (issue 15)."""
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from mam2_fast import study

_spec = importlib.util.spec_from_file_location("study_features", Path(__file__).resolve().parents[1] / "benchmarks" / "study_features.py")
sf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sf)


class _Fixed(torch.nn.Module):
    """forward_features -> [B, T, N, D]: a per-clip value (spread) plus a shared offset."""

    def __init__(self, per_clip: float):
        super().__init__()
        self.per_clip = per_clip

    def forward_features(self, x):
        B = x.shape[0]
        base = torch.arange(8, dtype=torch.float32) + 1.0                            # [D]
        noise = torch.randn(B, 1, 1, 8, generator=torch.Generator().manual_seed(B))  # [B, 1, 1, D]
        return (base + self.per_clip * noise).expand(B, 2, 3, 8)


def _batches(n, b=4):
    return [{"views": torch.zeros(b, 1, 2, 3, 8, 8)} for _ in range(n)]


def test_pooled_spread_is_zero_for_a_constant_feature_and_grows_with_the_per_clip_part():
    zero = sf.pooled_spread(_Fixed(0.0), _batches(3), clips=12)
    some = sf.pooled_spread(_Fixed(1.0), _batches(3), clips=12)
    more = sf.pooled_spread(_Fixed(4.0), _batches(3), clips=12)
    assert zero["clips"] == 12 and zero["between_over_mean"] == 0.0 and zero["ln_std_across_videos"] < 1e-3
    assert 0 < some["between_over_mean"] < more["between_over_mean"]
    assert some["ln_std_across_videos"] < more["ln_std_across_videos"]


@pytest.fixture(scope="module")
def micro_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "micro"
    assert study.main(["--budget", "micro", "--out", str(out), "--variants", "mam2,random", "--threads", "1"]) == 0
    return str(out)


def test_pools_spread_and_fit_on_a_micro_study(micro_study, capsys):
    sizes, lists, ckpts = sf.study_parts(micro_study)
    assert set(ckpts) == {"mam2"} and sizes["identities"] == 2
    encs = sf.load_encoders(micro_study, sizes, lists, ckpts, ["mam2", "random"])
    res = sf.run_pools(sizes, lists, encs, ["mean", "grid"])
    assert set(res) == {(p, e) for p in ("mean", "grid") for e in ("mam2", "random")}
    assert all(0 <= a <= 100 and 0 <= b <= 100 for a, b in res.values())
    # the study's own mean-pool probe stage gives the same numbers for the same cell
    rec = study.Results(Path(micro_study) / "results.json", {"budget": "micro", "sizes": sizes})
    assert rec.get("mam2/seed0", "probe_mean")["motion"] == pytest.approx(res[("mean", "mam2")][0])
    s = sf.pooled_spread(encs["random"], sf.view_data(sizes, lists["test"], 4), clips=8)
    assert s["clips"] == 8 and s["between_over_mean"] > 0
    with pytest.raises(SystemExit, match="no pre-trained seed-0 cell 'pixel'"):
        sf.load_encoders(micro_study, sizes, lists, ckpts, ["pixel"])
    e = sf.motion_energy(micro_study, sizes, lists, batches=2)
    assert e["batches"] == 2 and 0 < e["energy"] < 1 and 0 <= e["patch_mean_part"] <= e["block4_part"] <= 1
    for variant, head_only in (("mam2", True), ("random", False)):
        args = type("A", (), {"variant": variant, "label": "joint", "lr": 1e-3, "epochs": 1, "head_only": head_only})
        rows = sf.run_fit(micro_study, sizes, lists, ckpts, args)
        loss, acc = rows[0]
        assert math.isfinite(loss) and abs(loss - math.log(8)) < 0.5 and 0 <= acc <= 1


def test_headfit_and_scratch_on_a_micro_study(micro_study, capsys):
    sizes, lists, ckpts = sf.study_parts(micro_study)
    encs = sf.load_encoders(micro_study, sizes, lists, ckpts, ["mam2"])
    for head_input in ("fc_norm", "standardized"):
        out = sf.run_headfit(sizes, lists, encs, "appearance", 1e-2, [2, 5], head_input)
        assert [s for s, _ in out["mam2"]] == [2, 5] and all(0 <= a <= 100 for _, a in out["mam2"])
    for arch in ("vit", "cnn"):
        rows = sf.run_scratch(micro_study, sizes, lists, arch, steps=4, lr=1e-3, every=2)
        assert [r[0] for r in rows] == [2, 4]
        assert all(math.isfinite(r[1]) and 0 <= r[2] <= 100 and 0 <= r[3] <= 100 for r in rows)
    # another distractor count builds its own data beside the study's, and trains on it
    rows = sf.run_scratch(micro_study, sizes, lists, "cnn", steps=2, lr=1e-3, distractors=0, every=2)
    assert (Path(micro_study) / "data_distractors0" / "test" / "list.txt").is_file() and len(rows) == 1


def test_scratch_cnn_learns_a_clip_level_label_the_vit_test_can_compare_against():
    # the CNN baseline must be able to fit: 8 clips whose label is their brightness
    torch.manual_seed(0)
    x = torch.rand(8, 4, 3, 16, 16) * 0.2 + torch.arange(8).remainder(4).view(8, 1, 1, 1, 1) * 0.25
    y = torch.arange(8).remainder(4)
    m = sf.SmallCNN3D(4)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(200):
        loss = torch.nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (m(x).argmax(1) == y).float().mean() == 1.0 and loss.item() < 0.2
