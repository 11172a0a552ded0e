from pathlib import Path

import pytest

from mam2_fast.config import ConfigError, load_config, read_yaml
from mam2_fast.pretrain import demo_config_dict

CONFIGS = sorted(p for p in (Path(__file__).parent.parent / "configs").glob("*.yaml")
                 if not p.stem.startswith("finetune"))  # fine-tuning configs are tested with finetune


def test_configs_exist():
    names = {p.stem for p in CONFIGS}
    for need in ("demo", "k400_vit_b", "k400_vit_l", "ssv2_vit_b", "ucf101_vit_b", "hmdb51_vit_b"):
        assert need in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_loads(path):
    load_config(path, ["data.list_file=x.txt"] if "demo" not in path.stem else [])


def test_demo_yaml_matches_builtin_demo():
    assert read_yaml(Path(__file__).parent.parent / "configs" / "demo.yaml") == demo_config_dict()


def test_table7_presets():
    cfgs = {p.stem: load_config(p, ["data.list_file=x.txt"]) for p in CONFIGS if p.stem != "demo"}
    assert cfgs["k400_vit_b"].train.epochs == 800 and cfgs["k400_vit_b"].optim.warmup_epochs == 20
    assert cfgs["ssv2_vit_b"].train.epochs == 1200 and cfgs["ssv2_vit_b"].data.flip is False
    assert cfgs["ucf101_vit_b"].train.batch_size == 32 and cfgs["ucf101_vit_b"].train.epochs == 1200
    assert cfgs["hmdb51_vit_b"].train.epochs == 1600 and cfgs["hmdb51_vit_b"].optim.warmup_epochs == 40
    assert cfgs["k400_vit_l"].model.preset == "large"
    vm = cfgs.pop("videomae_baseline_k400")
    assert vm.model.arch == "videomae" and vm.mask.ratio == 0.9 and vm.model.tubelet_size == 2
    for c in cfgs.values():
        assert c.optim.base_lr == 1.5e-4 and c.optim.weight_decay == 0.05 and tuple(c.optim.betas) == (0.9, 0.95)
        assert c.mask.kind == "tube" and c.mask.ratio == 0.75 and c.data.sampling_stride == 4
        assert c.model.align_weight == 2.0 and c.model.appearance_depth == 4 and c.model.motion_depth == 2


@pytest.mark.parametrize("override,key", [
    (["model.dpeth=3"], "model.dpeth"),
    (["bogus.x=1"], "bogus"),
    (["mask.kind=checker"], "mask.kind"),
    (["mask.ratio=1.5"], "mask.ratio"),
    (["model.depth=two"], "model.depth"),
    (["train.batch_size=0"], "train.batch_size"),
    (["optim.betas=[0.9]"], "optim.betas"),
    (["model.kernels=turbo"], "model.kernels"),
    (["data.num_frames=4"], "data.num_frames"),
    (["model.use_appearance=false", "model.use_motion=false"], "use_appearance"),
    (["train.device=tpu"], "train.device"),
    (["train.prefetch=-2"], "train.prefetch"),
])
def test_bad_values_are_named(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(Path(__file__).parent.parent / "configs" / "demo.yaml", override)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


def test_list_file_required_for_real_runs(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {preset: tiny}\n")
    with pytest.raises(ConfigError, match="data.list_file"):
        load_config(p)


def test_overrides_parse_types():
    cfg = load_config(Path(__file__).parent.parent / "configs" / "demo.yaml",
                      ["mask.ratio=0.9", "model.use_motion=false", "optim.betas=[0.8,0.9]", "train.max_steps=7"])
    assert cfg.mask.ratio == 0.9 and cfg.model.use_motion is False
    assert tuple(cfg.optim.betas) == (0.8, 0.9) and cfg.train.max_steps == 7
