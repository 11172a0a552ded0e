"""Console entry points (``setup.py`` ``console_scripts``): ``mam2-pretrain``,
``mam2-finetune``, ``mam2-evaluate``, ``mam2-probe``, ``mam2-export``, ``mam2-prepare``,
``mam2-visualize``. Each is the module's ``python -m`` entry, with the same arguments
(``mam2-pretrain ...`` == ``python -m mam2_fast.pretrain ...``, also under ``torchrun``)."""
from __future__ import annotations

import importlib


def _training(module: str) -> None:
    from mam2_fast.train.distributed import run_cli
    run_cli(importlib.import_module(module).main)


def _plain(module: str) -> None:
    raise SystemExit(importlib.import_module(module).main())


def pretrain() -> None:
    _training("mam2_fast.pretrain")


def finetune() -> None:
    _training("mam2_fast.finetune")


def evaluate() -> None:
    _plain("mam2_fast.evaluate")


def probe() -> None:
    _plain("mam2_fast.probe")


def export() -> None:
    _plain("mam2_fast.export")


def prepare() -> None:
    _plain("mam2_fast.data.prepare")


def visualize() -> None:
    _plain("mam2_fast.visualize")


SCRIPTS = {"mam2-pretrain": "pretrain", "mam2-finetune": "finetune", "mam2-evaluate": "evaluate",
           "mam2-probe": "probe", "mam2-export": "export", "mam2-prepare": "prepare", "mam2-visualize": "visualize"}
