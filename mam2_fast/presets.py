"""Packaged config presets, usable by name from any directory.

    python -m mam2_fast.pretrain --config k400_vit_b           # = <package>/configs/k400_vit_b.yaml
    mam2-finetune -c finetune_ssv2_vit_b init=runs/ssv2_vit_b

:func:`resolve_config_path`: an existing path is used as given; otherwise a bare name (no
folder part, with or without ``.yaml``) is looked up among the presets shipped in
``mam2_fast/configs/`` (the repository's top-level ``configs/`` is a link to it). A
preset's ``base:`` is resolved beside it, so chains work from anywhere.
"""
from __future__ import annotations

from pathlib import Path
from typing import List

PRESET_DIR = Path(__file__).resolve().parent / "configs"


def preset_names() -> List[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def resolve_config_path(path: str | Path) -> Path:
    """``path`` if it exists, else the packaged preset of that name; else the path unchanged
    (the caller reports it missing, see :func:`missing_config_message`)."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    name = str(path)
    if "/" not in name and "\\" not in name:
        for cand in (PRESET_DIR / name, PRESET_DIR / f"{name}.yaml"):
            if cand.is_file():
                return cand
    return p


def missing_config_message(path: str | Path) -> str:
    return (f"config file not found: {path} (a file path, or a packaged preset name: "
            f"{', '.join(preset_names())})")


__all__ = ["PRESET_DIR", "preset_names", "resolve_config_path", "missing_config_message"]
