"""Every config value is type- and range-checked before anything is built (issue 17).

Walks every field of the pre-training and fine-tuning config dataclasses, gives it a
wrong-typed value and an out-of-range one, and runs the CLI ``main`` in-process: each must
print one line ``config error: <...key...>: ...`` and return 2, with ``train()`` never called
(no data, model or output folder built). New fields are covered automatically; a field that
accepts any value of its type is listed in ``FREE`` with the reason.
"""
from __future__ import annotations

import dataclasses
import typing

import pytest

import mam2_fast.finetune as finetune_cli
import mam2_fast.pretrain as pretrain_cli
from mam2_fast.config import Config, ConfigError, load_config
from mam2_fast.ft.config import FinetuneConfig

# fields whose whole type is valid (paths, names): only the wrong type is tried
FREE = {"name", "init", "train.output_dir", "data.list_file", "data.root", "data.demo_dir", "test.list_file",
        "model.flow_weights", "tokenizer.checkpoint", "tokenizer.checkpoint_config", "tokenizer.preset"}


def _fields(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _fields(tp, key + ".")
        else:
            yield key, tp


def _base(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)) \
        and args else tp


def _bad_values(key, tp):
    """(label, override value) pairs that must be refused."""
    tp = _base(tp)
    wrong = {bool: "maybe", int: "seven", float: "fast", str: "[1, 2]"}.get(tp, "7")
    if tp is tuple or typing.get_origin(tp) is tuple:
        wrong = "7"
    out = [("wrong type", wrong)]
    if key in FREE or tp is bool:
        return out
    if tp is int:
        out.append(("out of range", "-1000000"))
    elif tp is float:
        out += [("out of range", "-1.0e+9"), ("nan", ".nan")]
    elif tp is str:
        out.append(("not a choice", "no-such-choice"))
    elif tp is tuple or typing.get_origin(tp) is tuple:
        out.append(("empty", "[]"))
    return out


def _cases(cls):
    return [(key, label, value) for key, tp in _fields(cls) for label, value in _bad_values(key, tp)]


def _run(cli, key, value, tmp_path, capsys, monkeypatch):
    def never(*a, **k):
        raise AssertionError(f"{key}={value}: training started with an invalid value")
    monkeypatch.setattr(cli, "train", never)
    argv = [f"train.output_dir={tmp_path / 'run'}", f"data.demo_dir={tmp_path / 'demo'}", f"{key}={value}"]
    if key in ("train.output_dir", "data.demo_dir"):
        argv = argv[2:]
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, f"{key}={value} was accepted"
    assert len(err) == 1 and err[0].startswith("config error: ") and key.split(".")[-1] in err[0], (key, value, err)
    assert not (tmp_path / "run").exists() and not (tmp_path / "demo").exists()


@pytest.mark.parametrize("key,label,value", _cases(Config), ids=lambda v: str(v))
def test_pretrain_config_value_is_checked(key, label, value, tmp_path, capsys, monkeypatch):
    _run(pretrain_cli, key, value, tmp_path, capsys, monkeypatch)


@pytest.mark.parametrize("key,label,value", _cases(FinetuneConfig), ids=lambda v: str(v))
def test_finetune_config_value_is_checked(key, label, value, tmp_path, capsys, monkeypatch):
    _run(finetune_cli, key, value, tmp_path, capsys, monkeypatch)


def test_issue_examples_are_refused_with_their_key():
    for override, key in [("data.max_bad_fraction=-1", "data.max_bad_fraction"),
                          ("data.num_workers=-2", "data.num_workers"),
                          ("data.decode_timeout_s=0", "data.decode_timeout_s"),
                          ("train.seed=-1", "train.seed"), ("data.backend=ffmpeg", "data.backend"),
                          ("data.short_video=stretch", "data.short_video"), ("data.mp_context=threads", "data.mp_context")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, ["data.demo=true", override])


def test_config_that_includes_itself_is_an_error(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("base: b.yaml\nname: a\n")
    b.write_text("base: a.yaml\nname: b\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(a)
    (tmp_path / "self.yaml").write_text("base: self.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "self.yaml")
