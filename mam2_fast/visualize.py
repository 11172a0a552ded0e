"""Pictures of what a pre-trained MAM^2 model predicts, and a run's loss curves.

    python -m mam2_fast.visualize runs/demo                     # -> runs/demo/viz/*.png
    python -m mam2_fast.visualize runs/demo/checkpoint-00000100.pt --clips 4 --list val.txt --out viz/

For each of ``--clips`` videos (centre crop of one clip, tube mask drawn with ``--seed``), one
PNG ``clip<i>.png`` titled with the video's name and the clip's scores, one column per frame
(``frame 0`` ... ``frame T-1``) and one titled row per picture (the titles below, ``ROW_TITLES``):

1. ``input frames``;  2. ``mask (dark = masked)``: masked patches darkened;
3. ``target: RGB diff``: true ``x_t - x_{t-1}`` per patch (normalized units; mid-gray = 0);
4. ``prediction: RGB diff``: predicted on the masked patches (visible patches: flat gray);
5. ``target: codes``: true appearance codes (tokenizer ids, one colour per code);
6. ``prediction: codes``: argmax of ``app_logits`` on masked patches, true codes faded elsewhere.

``curves.png``: the losses (loss, loss_app, loss_motion, loss_align) on one panel and app_acc
on another, against the step, read from the run's ``metrics.jsonl``, with a title, numbered
axes and a legend. Drawn with Pillow, or matplotlib when installed (``pip install mam2_fast[viz]``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from mam2_fast.ft.plots import code_palette, save_curves_png, save_image_grid, signed_map
from mam2_fast.kernels.reference import rgb_diff_target_ref, unpatchify

CURVE_KEYS = ("loss", "loss_app", "loss_motion", "loss_align", "app_acc")
ROW_TITLES = {"frames": "input frames", "mask": "mask (dark = masked)", "true_diff": "target: RGB diff",
              "pred_diff": "prediction: RGB diff", "true_codes": "target: codes", "pred_codes": "prediction: codes"}


def load_pretrained(path: str | Path):
    """(MAM2 model, tokenizer or None, Config, checkpoint path) from a pre-training checkpoint."""
    from mam2_fast.config import config_from_dict
    from mam2_fast.ft.weights import WeightsError, resolve_weights_path
    from mam2_fast.models.mam2 import build_model
    from mam2_fast.targets.tokenizer import build_tokenizer
    from mam2_fast.train.checkpoint import load_checkpoint

    p = resolve_weights_path(path)
    ckpt = load_checkpoint(p)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt or ckpt.get("kind") == "finetune":
        raise WeightsError(f"{p}: not a pre-training checkpoint (needs 'model' and 'config')")
    cfg = config_from_dict(ckpt["config"])
    tok = None
    if ckpt.get("tokenizer") is not None:
        tok = build_tokenizer(cfg.tokenizer, cfg.model.patch_size)
        tok.load_state_dict(ckpt["tokenizer"])
        tok.eval()
    model = build_model(cfg.model, vocab_size=tok.vocab_size if tok is not None else None,
                        pixel_mean=tuple(cfg.data.mean), pixel_std=tuple(cfg.data.std))
    model.load_state_dict(ckpt["model"])
    return model.eval(), tok, cfg, p


def _frames_img(clip: torch.Tensor, mean, std) -> np.ndarray:
    """[T, C, H, W] normalized -> [T, H, W, 3] in [0, 1]."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (clip * s + m).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def _cells(values: np.ndarray, grid: tuple[int, int], patch: int) -> np.ndarray:
    """per-patch RGB [T, N, 3] -> image [T, h*P, w*P, 3]."""
    T = values.shape[0]
    img = values.reshape(T, grid[0], grid[1], 3)
    return np.repeat(np.repeat(img, patch, 1), patch, 2)


@torch.no_grad()
def clip_panels(model, tokenizer, clip: torch.Tensor, info, mean, std) -> tuple[list, dict]:
    """Rows of images for one clip ``[1, T, C, H, W]`` and its mask; plus numbers for the title."""
    from mam2_fast.pretrain import denormalize

    P, grid, N = model.patch_size, model.grid, model.num_patches
    T = clip.shape[1]
    mask = info.mask[0]                                                  # [T, N] True = masked
    pred = model.predict(clip, info)
    frames = _frames_img(clip[0], mean, std)                            # [T, H, W, 3]
    cellmask = _cells(mask.float()[..., None].expand(T, N, 3).numpy(), grid, P)
    rows = [(ROW_TITLES["frames"], list(frames)), (ROW_TITLES["mask"], list(frames * (1 - 0.7 * cellmask)))]
    stats = {}

    true_diff = rgb_diff_target_ref(model.motion_clip(clip), P)         # [1, T, N, PPC] (model.motion_space)
    C = clip.shape[2]
    scale = float(true_diff.abs().amax()) or 1.0
    to_img = lambda d: unpatchify(d, P, C, *grid)[0].permute(0, 2, 3, 1).numpy()  # noqa: E731
    rows.append((ROW_TITLES["true_diff"], list(signed_map(to_img(true_diff), scale))))
    if "rgb_diff" in pred:
        full = torch.zeros_like(true_diff)
        full[0][mask] = pred["rgb_diff"][0].reshape(-1, true_diff.shape[-1]) if info.is_tube else pred["rgb_diff"][0][mask]
        full[:, 0] = 0
        rows.append((ROW_TITLES["pred_diff"], list(signed_map(to_img(full), scale))))
        sel = mask.clone()
        sel[0] = False
        stats["motion_mse"] = float(((full - true_diff) ** 2).mean(-1)[0][sel].mean())

    if tokenizer is not None and "app_logits" in pred:
        codes = tokenizer.tokenize(denormalize(clip.float(), mean, std)).flatten(2)[0]   # [T, N]
        pal = code_palette(int(tokenizer.vocab_size))
        rows.append((ROW_TITLES["true_codes"], list(_cells(pal[codes.numpy()], grid, P))))
        logits = pred["app_logits"][0]
        pcodes = codes.clone()
        if info.is_tube:
            pcodes[mask] = logits.argmax(-1).reshape(-1)
        else:
            pcodes[mask] = logits.argmax(-1)[mask]
        colors = pal[pcodes.numpy()]                                     # [T, N, 3]
        faded = 0.25 * colors + 0.75
        colors = np.where(mask.numpy()[..., None], colors, faded)
        rows.append((ROW_TITLES["pred_codes"], list(_cells(colors, grid, P))))
        stats["code_acc"] = float((pcodes[mask] == codes[mask]).float().mean())
    return rows, stats


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mam2_fast.visualize", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="pre-training checkpoint or run folder")
    ap.add_argument("--clips", type=int, default=3, help="number of videos to draw")
    ap.add_argument("--list", help="list file to take videos from (default: the run's data / demo set)")
    ap.add_argument("--seed", type=int, default=0, help="mask seed")
    ap.add_argument("--out", help="output folder (default: <run>/viz)")
    ap.add_argument("--metrics", help="metrics.jsonl for the curves (default: beside the checkpoint)")
    args = ap.parse_args(argv)

    from mam2_fast.ft.data import ViewData
    from mam2_fast.ft.weights import WeightsError
    from mam2_fast.masking import MaskGenerator

    try:
        model, tok, cfg, path = load_pretrained(args.checkpoint)
    except WeightsError as e:
        print(f"visualize error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else path.parent / "viz"
    out.mkdir(parents=True, exist_ok=True)
    list_file = args.list or cfg.data.list_file
    if list_file is None and cfg.data.demo:
        from mam2_fast.data import make_demo_dataset
        list_file = make_demo_dataset(cfg.data.demo_dir, num_videos=cfg.data.demo_num_videos, seed=0)
    if list_file is None:
        print("visualize error: no --list and the run has no data.list_file", file=sys.stderr)
        return 2
    data = ViewData(cfg.data, list_file, num_clips=1, num_crops=1, batch_size=1, limit=args.clips)
    masker = MaskGenerator(cfg.mask.kind, cfg.mask.ratio, cfg.model.num_frames, model.grid,
                           cfg.mask.cube_min_block, cfg.mask.cube_max_aspect)
    written = []
    for i, batch in enumerate(data):
        clip = batch["views"][:, 0]                                       # [1, T, C, H, W]
        info = masker(1, torch.Generator().manual_seed(args.seed * 1000 + i))
        rows, stats = clip_panels(model, tok, clip, info, cfg.data.mean, cfg.data.std)
        title = f"{Path(data.records[int(batch['index'][0])].path).name}  " + \
                "  ".join(f"{k} {v:.3f}" for k, v in stats.items())
        cols = [f"frame {t}" for t in range(clip.shape[1])]
        written.append(str(save_image_grid(rows, out / f"clip{i}.png", title=title, col_titles=cols)))
    metrics_path = Path(args.metrics) if args.metrics else path.parent / "metrics.jsonl"
    if metrics_path.is_file():
        from mam2_fast.train.metrics import read_metrics

        written.append(str(save_curves_png(read_metrics(metrics_path), CURVE_KEYS, out / "curves.png",
                                           title=str(metrics_path.parent))))
    else:
        print(f"[mam2_fast] no {metrics_path}: loss curves skipped", file=sys.stderr)
    print(json.dumps({"written": written}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
