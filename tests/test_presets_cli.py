"""Configs usable by name from any directory (packaged presets) and the console scripts."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from mam2_fast.config import ConfigError, read_yaml
from mam2_fast.presets import PRESET_DIR, preset_names, resolve_config_path

ROOT = Path(__file__).resolve().parent.parent


def test_presets_are_packaged_and_the_top_level_folder_still_works():
    assert PRESET_DIR == ROOT / "mam2_fast" / "configs"
    names = preset_names()
    assert {"demo", "k400_vit_b", "finetune_ssv2_vit_b", "videomae_baseline_k400"} <= set(names)
    assert sorted(p.stem for p in (ROOT / "configs").glob("*.yaml")) == names


def test_config_by_name_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("k400_vit_b", "k400_vit_b.yaml", "finetune_k400_vit_b"):    # the last has a base: chain
        assert resolve_config_path(name).parent == PRESET_DIR
        assert read_yaml(name)
    assert read_yaml("finetune_k400_vit_b")["model"]["num_classes"] == 400      # merged with its base
    # a local file wins over a preset of the same name
    (tmp_path / "k400_vit_b.yaml").write_text("name: mine\n")
    assert read_yaml("k400_vit_b.yaml") == {"name": "mine"}
    with pytest.raises(ConfigError, match="packaged preset name: .*k400_vit_b"):
        read_yaml("no_such_preset")


def test_console_scripts_point_at_entry_functions():
    import importlib

    from mam2_fast import cli
    tree = ast.parse((ROOT / "setup.py").read_text())
    scripts = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
               and n.value.startswith("mam2-") and "=" in n.value]
    found = dict(s.split("=", 1) for s in scripts)
    assert {"mam2-pretrain", "mam2-finetune", "mam2-evaluate", "mam2-probe", "mam2-export",
            "mam2-prepare"} <= set(found)
    for script, target in found.items():
        mod, fn = target.split(":")
        assert callable(getattr(importlib.import_module(mod), fn)), script
        assert cli.SCRIPTS[script] == fn


def test_console_script_runs_the_module(monkeypatch, capsys):
    from mam2_fast import cli
    monkeypatch.setattr("sys.argv", ["mam2-export", "--help"])
    with pytest.raises(SystemExit) as e:
        cli.export()
    assert e.value.code == 0 and "hf-videomae" in capsys.readouterr().out
