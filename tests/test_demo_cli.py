"""`python -m mam2_fast.pretrain` with no config: the demo path end to end (a few steps)."""
import json

from mam2_fast.pretrain import main
from mam2_fast.train.metrics import read_metrics


def test_demo_cli_runs_end_to_end(tmp_path, capsys):
    rc = main(["--max-steps", "3", f"data.demo_dir={tmp_path / 'data'}", f"train.output_dir={tmp_path / 'run'}",
               "data.demo_num_videos=16", "tokenizer.kmeans_fit_clips=16", "train.log_every=1",
               "train.tensorboard=false"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "checkpoint:" in out and "metrics:" in out
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3]
    for k in ("loss", "loss_app", "loss_motion", "loss_align", "clips_per_s", "data_bad_videos"):
        assert k in recs[-1]
    assert (tmp_path / "run" / "checkpoint-00000003.pt").exists()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["name"] == "demo"
    assert len(list((tmp_path / "data").glob("*/train.txt"))) == 1     # one variant sub-folder
    assert (tmp_path / "data" / ".mam2_fast_demo").is_file()


def test_cli_rejects_bad_config_before_training(tmp_path, capsys):
    rc = main(["model.depht=3", f"train.output_dir={tmp_path}"])
    assert rc == 2
    assert "model.depht" in capsys.readouterr().err
    assert not (tmp_path / "metrics.jsonl").exists()
