"""The representation study CLI (issue 15): the micro budget end to end, resumable."""
import json

import pytest

from mam2_fast import study


def test_micro_study_runs_every_variant_and_resumes(tmp_path, capsys):
    out = tmp_path / "study"
    assert study.main(["--budget", "micro", "--out", str(out), "--variants", "mam2,no_motion,videomae,random",
                       "--threads", "1"]) == 0
    res = json.loads((out / "results.json").read_text())
    cells = res["cells"]
    assert set(cells) == {"mam2/seed0", "no_motion/seed0", "videomae/seed0", "random/seed0"}
    for name, cell in cells.items():
        assert "error" not in cell["probe"] and "error" not in cell["finetune"], (name, cell)
        assert 0 <= cell["probe"]["motion"] <= 100 and 0 <= cell["finetune"]["appearance"] <= 100
    assert "feat_rank" in cells["mam2/seed0"]["pretrain"]["last"]
    assert all(cell["probe"]["heldout_feat_rank"] > 0 for cell in cells.values())   # random included
    assert all(cell["probe"]["pool"] == "grid" and cell["probe_mean"]["pool"] == "mean" for cell in cells.values())
    assert all(0 <= cell["probe_mean"]["motion"] <= 100 for cell in cells.values())
    table = (out / "table.md").read_text()
    assert "| mam2 |" in table and "removing motion hurts" in table and "mean-pool probe" in table
    # a second run of the same command finds everything recorded and trains nothing
    capsys.readouterr()
    before = (out / "results.json").read_text()
    assert study.main(["--budget", "micro", "--out", str(out), "--variants", "mam2,no_motion,videomae,random",
                       "--threads", "1"]) == 0
    log = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[study]")]
    assert not any("pre-training" in line or "fine-tune motion" in line or "probe motion" in line for line in log), log
    assert json.loads((out / "results.json").read_text())["cells"] == json.loads(before)["cells"]
    # a study recorded before a stage existed (no mean-pool probe) gets only that stage on a re-run
    res = json.loads(before)
    for cell in res["cells"].values():
        del cell["probe_mean"]
    (out / "results.json").write_text(json.dumps(res))
    assert study.main(["--budget", "micro", "--out", str(out), "--variants", "mam2,random", "--threads", "1"]) == 0
    log = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[study]")]
    assert sum("mean-pool probe" in line for line in log) == 2, log
    assert not any("pre-training" in line or "fine-tune motion" in line or "grid-pool probe" in line for line in log), log
    after = json.loads((out / "results.json").read_text())["cells"]
    assert after["mam2/seed0"]["probe"] == json.loads(before)["cells"]["mam2/seed0"]["probe"]
    assert "probe_mean" in after["mam2/seed0"] and "probe_mean" not in after["videomae/seed0"]


def test_target_baselines_of_a_run(tmp_path):
    out = tmp_path / "study"
    study.main(["--budget", "micro", "--out", str(out), "--variants", "mam2", "--threads", "1"])
    b = study.target_baselines(str(out / "runs" / "mam2" / "pretrain-seed0"), batches=2)
    assert 0 < b["code_entropy_nats"] <= b["log_vocab"] + 1e-6
    assert 0 < b["zero_motion_mse_raw"] < 1
    # which term pulls on the encoder: all three present, shares sum to one, the trained model
    # is the run's checkpoint (not the initialization: its alignment loss differs)
    run = str(out / "runs" / "mam2" / "pretrain-seed0")
    init, trained = (study.loss_gradient_balance(run, batches=1, at_init=a) for a in (True, False))
    assert init["model"] == "init" and trained["model"].startswith("checkpoint-")
    for r in (init, trained):
        assert set(r["terms"]) == {"loss_app", "loss_motion", "loss_align"}
        assert abs(sum(t["share"] for t in r["terms"].values()) - 1) < 1e-9
        assert all(t["weighted_grad_norm_encoder"] > 0 for t in r["terms"].values())
    assert trained["terms"]["loss_align"]["loss"] != init["terms"]["loss_align"]["loss"]


def test_a_second_process_on_the_same_study_folder_is_refused(tmp_path):
    import subprocess
    import sys

    folder = tmp_path / "study"
    folder.mkdir()
    study._lock_study(folder)                       # this process holds the folder
    code = ("import sys; from mam2_fast import study; "
            f"study._lock_study(__import__('pathlib').Path({str(folder)!r}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "another process is running the study" in r.stderr, r.stderr
    assert study._lock_study(folder) is study._lock_study(folder)   # the same process may re-enter


def test_every_budget_and_variant_builds_a_valid_config_and_model(tmp_path):
    """A GPU run of ``--budget full --device cuda`` must not stop on a config error after the
    data is built: every (budget, variant) gives a pre-training config that validates, a model
    that builds with the budget's sizes (all small enough for the CPU), and a fine-tuning
    config that validates for its architecture."""
    from mam2_fast.ft.weights import arch_from_pretrain_config
    from mam2_fast.models.mam2 import build_model
    from mam2_fast.pretrain import build_baseline

    lst = str(tmp_path / "list.txt")
    for budget, b in study.BUDGETS.items():
        device = "cuda" if budget == "full" else "cpu"
        for variant in study.VARIANTS:
            src = "mam2" if study.VARIANTS[variant] is None else variant
            cfg = study.pretrain_config(b, src, 0, lst, tmp_path / "run", device)
            assert cfg.train.max_steps == b["pretrain_steps"] and cfg.train.device == device
            model = build_baseline(cfg) if cfg.model.arch == "videomae" else build_model(cfg.model, b["vocab_size"])
            enc = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("blocks.", "encoder.")))
            assert enc > 0, (budget, variant)
            arch = arch_from_pretrain_config(cfg.to_dict())
            assert (arch["embed_dim"], arch["depth"], arch["img_size"], arch["num_frames"]) == \
                (b["embed_dim"], b["depth"], b["input_size"], b["num_frames"]), (budget, variant, arch)
            for recipe in study.FINETUNE_RECIPES.values():
                ft = study.finetune_config(b, None, 0, lst, lst, tmp_path / "ft", device, arch, dict(recipe))
                assert ft.model.num_classes == b["identities"] * study.N_DIRECTIONS


def test_pretraining_follows_warmup_and_cosine_over_the_budget(tmp_path):
    """The study's pre-training anneals (the paper's cosine) over its budget's steps: until
    2026-12-04 it ran at the peak lr throughout (10**6 epochs cut by max_steps)."""
    from mam2_fast.data.sampler import ResumableSampler
    from mam2_fast.train.loop import Schedule

    for budget in ("smoke", "small", "full"):
        b = study.BUDGETS[budget]
        cfg = study.pretrain_config(b, "mam2", 0, str(tmp_path / "l.txt"), tmp_path / "r", "cpu")
        spe = ResumableSampler(b["train_videos"], num_sample=cfg.data.num_sample,
                               videos_per_step=cfg.train.batch_size // cfg.data.num_sample,
                               epoch_unit=cfg.data.epoch_unit).steps_per_epoch
        sch = Schedule.plan(cfg, spe, 1)
        assert sch.last_step == b["pretrain_steps"] <= sch.total_steps < b["pretrain_steps"] + spe, (budget, sch)
        assert sch.lr(sch.warmup_steps) == pytest.approx(sch.peak_lr, rel=1e-3)
        assert sch.lr(sch.last_step - 1) < 0.02 * sch.peak_lr + sch.min_lr, (budget, sch.lr(sch.last_step - 1))
        assert sch.lr(b["pretrain_steps"] // 2) < 0.75 * sch.peak_lr


def test_a_folder_from_the_constant_lr_study_is_refused(tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    sizes = {k: v for k, v in study.BUDGETS["micro"].items() if k != "lr_schedule"}
    (out / "results.json").write_text(json.dumps({"meta": {"budget": "micro", "sizes": sizes}, "cells": {}}))
    with pytest.raises(SystemExit, match="another sizes"):
        study.main(["--budget", "micro", "--out", str(out), "--variants", "mam2", "--threads", "1"])


def test_target_check_needs_two_seeds_for_a_margin_in_std():
    one = {"mam2": {"finetune_motion": (40.0, 0.0, 1), "probe_motion": (60.0, 0.0, 1)},
           "random": {"finetune_motion": (30.0, 0.0, 1), "probe_motion": (50.0, 0.0, 1)}}
    rows = {text: (verdict, nums) for text, verdict, nums in study.check_targets(one)}
    assert rows["fine-tune from MAM² beats scratch on motion by > 2 std"][0] == "n/a"
    assert "2 seeds" in rows["fine-tune from MAM² beats scratch on motion by > 2 std"][1]
    three = {"mam2": {"finetune_motion": (40.0, 3.0, 3)}, "random": {"finetune_motion": (30.0, 6.0, 3)}}
    rows = {text: (verdict, nums) for text, verdict, nums in study.check_targets(three)}
    assert rows["fine-tune from MAM² beats scratch on motion by > 2 std"] == ("miss", "40.0 vs 30.0 (gap +10.0, needed > 12.0)")
    three["random"]["finetune_motion"] = (30.0, 4.0, 3)
    rows = {text: (verdict, nums) for text, verdict, nums in study.check_targets(three)}
    assert rows["fine-tune from MAM² beats scratch on motion by > 2 std"][0] == "pass"


def test_finetune_at_chance_note():
    # 192 test videos: chance + 2 SE is 31.2 % at 4 classes
    agg = {"mam2": {"finetune_motion": (27.0, 2.0, 3), "finetune_appearance": (30.0, 1.0, 3)},
           "random": {"finetune_motion": (24.0, 2.0, 3), "finetune_appearance": (22.0, 1.0, 3)}}
    note = study.finetune_at_chance(agg, identities=4, test_videos=192)
    assert note and "31.2 %" in note and "30.0 %" in note
    agg["mam2"]["finetune_appearance"] = (32.0, 1.0, 3)             # one cell above the bound: informative
    assert study.finetune_at_chance(agg, identities=4, test_videos=192) is None
    assert study.finetune_at_chance({"mam2": {}}, identities=4, test_videos=192) is None   # nothing fine-tuned yet


def test_first_seed_runs_only_the_seeds_asked_for(tmp_path, monkeypatch):
    """``--first-seed 2 --seeds 1``: seed 2 of every variant and nothing else (adding a seed to a
    grid whose other seeds ran elsewhere); the table counts that seed."""
    ran, tables = [], []
    monkeypatch.setattr(study, "build_data", lambda *a, **k: None)
    monkeypatch.setattr(study, "run_cell", lambda res, st, b, v, seed, *a, **k: ran.append((v, seed)))
    monkeypatch.setattr(study, "write_table", lambda res, st, variants, seeds, cmd: tables.append(seeds) or "")
    assert study.main(["--budget", "micro", "--out", str(tmp_path / "s"), "--variants", "mam2,random",
                       "--first-seed", "2", "--seeds", "1"]) == 0
    assert ran == [("mam2", 2), ("random", 2)] and tables == [[2]]
    with pytest.raises(SystemExit, match="first-seed"):
        study.main(["--budget", "micro", "--out", str(tmp_path / "t"), "--first-seed", "-1"])


def test_a_stopped_pretraining_is_not_recorded_and_a_rerun_resumes_it(tmp_path, monkeypatch, capsys):
    """SIGTERM stops a pre-training run with a checkpoint (``interrupted`` in its summary): the
    study stops too, records nothing for that cell (it used to record the part-trained encoder
    as the cell's and probe it), and the same command resumes the run. A folder that recorded
    such a run before the fix has the cell's pre-training resumed and its measures redone."""
    import mam2_fast.pretrain as pretrain

    out = tmp_path / "s"
    argv = ["--budget", "micro", "--out", str(out), "--variants", "mam2", "--threads", "1"]
    monkeypatch.setattr(study, "run_probe", lambda *a, **k: {"motion": 50.0, "appearance": 50.0, "pool": "grid"})
    monkeypatch.setattr(study, "run_finetune", lambda *a, **k: {"motion": 25.0, "appearance": 25.0, "seconds": 0})
    monkeypatch.setattr("mam2_fast.probe.load_frozen_encoder", lambda *a, **k: (None, None))
    real_train = pretrain.train
    resumes = []

    def stopped(cfg, resume=None, log=print, **kw):
        resumes.append(resume)
        cfg.train.max_steps = 2                          # the run stops half-way, as SIGTERM makes it
        summary = real_train(cfg, resume=resume, log=log, **kw)
        return {**summary, "interrupted": True}
    monkeypatch.setattr(pretrain, "train", stopped)
    with pytest.raises(SystemExit, match="stopped at step 2"):
        study.main(argv)
    assert json.loads((out / "results.json").read_text())["cells"] == {}
    monkeypatch.setattr(pretrain, "train", lambda cfg, resume=None, log=print, **kw:
                        resumes.append(resume) or real_train(cfg, resume=resume, log=log, **kw))
    assert study.main(argv) == 0
    assert resumes == [None, "auto"]                    # the second run resumed the first's checkpoint
    cell = json.loads((out / "results.json").read_text())["cells"]["mam2/seed0"]
    assert cell["pretrain"]["steps"] == study.BUDGETS["micro"]["pretrain_steps"]
    # a folder recorded before the fix: a short pre-training and measures taken on it
    res = json.loads((out / "results.json").read_text())
    res["cells"]["mam2/seed0"]["pretrain"]["steps"] = 2
    (out / "results.json").write_text(json.dumps(res))
    capsys.readouterr()
    assert study.main(argv) == 0
    assert "recorded pre-training stopped at step 2" in capsys.readouterr().out
    assert resumes[-1] == "auto"
    cell = json.loads((out / "results.json").read_text())["cells"]["mam2/seed0"]
    assert cell["pretrain"]["steps"] == study.BUDGETS["micro"]["pretrain_steps"] and "probe" in cell
