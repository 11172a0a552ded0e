"""Fused augmentation (csrc/ extension) vs the plain-torch F.interpolate reference."""
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mam2_fast.data import augment
from mam2_fast.data.augment import crop_resize_normalize, crop_resize_normalize_torch, make_params
from mam2_fast.data.sampling import multiscale_crop_box, rng_for

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
needs_ext = pytest.mark.skipif(augment.load_extension() is None, reason="augmentation extension not built")


def _random_case(seed, n=3, t=4, h=37, w=53, m=6):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(0, 256, (n, t, h, w, 3), dtype=torch.uint8, generator=g)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(m):
        cw, ch = int(rng.integers(1, w + 1)), int(rng.integers(1, h + 1))
        box = (int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1)), cw, ch)
        rows.append((int(rng.integers(n)), i, box, bool(rng.random() < 0.5)))
    return src, make_params(*zip(*rows))


def test_reference_matches_interpolate_by_hand():
    src, params = _random_case(0, m=1)
    s, d, x0, y0, w, h, flip = params[0].tolist()
    out = torch.empty(1, 4, 3, 19, 23)
    crop_resize_normalize_torch(src, params, MEAN, STD, out)
    crop = src[s, :, y0:y0 + h, x0:x0 + w].permute(0, 3, 1, 2).float()
    ref = F.interpolate(crop, size=(19, 23), mode="bilinear", align_corners=False)
    ref = ref.flip(-1) if flip else ref
    ref = (ref / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out[0], ref)


@needs_ext
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("size", [(24, 24), (17, 29), (1, 5), (96, 96)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extension_matches_torch(seed, size, dtype):
    src, params = _random_case(seed)
    got = torch.full((6, 4, 3, *size), float("nan"), dtype=dtype)
    want = torch.empty_like(got)
    crop_resize_normalize(src, params, MEAN, STD, got, impl="extension")
    crop_resize_normalize_torch(src, params, MEAN, STD, want)
    tol = dict(atol=2e-5, rtol=0) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(got, want, **tol)


@needs_ext
def test_extension_multiscale_boxes_and_scattered_rows():
    # VideoMAE MultiScaleCrop boxes on a 128x171 frame, written to scattered output rows
    src = torch.randint(0, 256, (2, 3, 128, 171, 3), dtype=torch.uint8)
    rows = []
    for i in range(8):
        rng = rng_for(0, i, tag="crop")
        rows.append((i % 2, 7 - i, multiscale_crop_box(128, 171, 112, rng), i % 3 == 0))
    params = make_params(*zip(*rows))
    got, want = torch.empty(8, 3, 3, 112, 112), torch.empty(8, 3, 3, 112, 112)
    crop_resize_normalize(src, params, MEAN, STD, got, impl="extension")
    crop_resize_normalize_torch(src, params, MEAN, STD, want)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def test_bad_boxes_rejected():
    src = torch.zeros(1, 2, 8, 8, 3, dtype=torch.uint8)
    out = torch.empty(1, 2, 3, 4, 4)
    with pytest.raises(ValueError, match="out of range"):
        crop_resize_normalize(src, make_params([0], [0], [(4, 0, 8, 8)], [False]), MEAN, STD, out)
    with pytest.raises(ValueError, match="uint8"):
        crop_resize_normalize(src.float(), make_params([0], [0], [(0, 0, 8, 8)], [False]), MEAN, STD, out)


def test_fallback_when_extension_missing(monkeypatch, caplog):
    monkeypatch.setattr(augment, "_ext", None)
    monkeypatch.setattr(augment, "_ext_error", "No module named 'mam2_fast._augment'")
    monkeypatch.setattr(augment, "_notified", False)
    src, params = _random_case(1)
    out, want = torch.empty(6, 4, 3, 16, 16), torch.empty(6, 4, 3, 16, 16)
    with caplog.at_level(logging.WARNING, logger="mam2_fast.data"):
        crop_resize_normalize(src, params, MEAN, STD, out)
        crop_resize_normalize(src, params, MEAN, STD, out)
    notices = [r for r in caplog.records if "extension not available" in r.getMessage()]
    assert len(notices) == 1  # one notice, not one per batch
    crop_resize_normalize_torch(src, params, MEAN, STD, want)
    torch.testing.assert_close(out, want)
    with pytest.raises(RuntimeError, match="unavailable"):
        crop_resize_normalize(src, params, MEAN, STD, out, impl="extension")
