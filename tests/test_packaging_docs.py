"""Packaging and docs for optional pieces (issue 18): the ``flow`` extra installs torchvision
(unpinned, so pip keeps the installed torch build), and the README says where the presets'
VQGAN checkpoint comes from and how to check it."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _extras() -> dict:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "extras_require":
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no extras_require")


def _section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, re.S | re.M)
    assert m, f"README has no '## {title}' section"
    return m.group(1)


def test_flow_extra_installs_unpinned_torchvision():
    extras = _extras()
    assert "flow" in extras
    reqs = extras["flow"]
    tv = [r for r in reqs if r.split(";")[0].strip().lower().startswith("torchvision")]
    assert tv, reqs
    # no version constraint: a pin could make pip swap the installed torch for another build
    assert all(re.fullmatch(r"torchvision(\s*;.*)?", r.strip(), re.I) for r in tv), tv
    assert not any(r.lower().startswith("torch") and not r.lower().startswith("torchvision") for r in reqs)


def test_readme_targets_section_documents_flow_extra_and_vqgan_source():
    sec = _section("Appearance and motion targets")
    assert '.[flow]' in sec and "torchvision" in sec
    # the presets' tokenizer, by the name the code expects, and its public source
    from mam2_fast.targets.vqgan import VQGAN_PRESETS
    preset = "vqgan_imagenet_f16_16384"
    assert preset in VQGAN_PRESETS and preset in sec
    assert "taming-transformers" in sec
    assert "https://heibox.uni-heidelberg.de/d/a7530b09fed84f80a887/" in sec
    assert "last.ckpt" in sec and "model.yaml" in sec
    # no invented checksum: how to make and check one
    assert "sha256sum" in sec and "sha256sum -c" in sec
    assert not re.search(r"\b[0-9a-f]{64}\b", sec)


def test_presets_use_the_documented_vqgan():
    import yaml
    cfg = yaml.safe_load((ROOT / "configs" / "pretrain_base.yaml").read_text())
    assert cfg["tokenizer"]["kind"] == "vqgan"
    assert cfg["tokenizer"]["preset"] == "vqgan_imagenet_f16_16384"
