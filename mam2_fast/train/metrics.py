"""Run metrics: JSONL + CSV files, optional TensorBoard, and a console progress bar."""
from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path
from typing import Optional


class MetricsLogger:
    def __init__(self, run_dir: str | Path, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.jsonl_path = self.run_dir / "metrics.jsonl"
        self.csv_path = self.run_dir / "metrics.csv"
        self._csv_fields: Optional[list[str]] = None
        self.tb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.csv_path.exists():
            with open(self.csv_path) as f:
                header = f.readline().strip()
                self._csv_fields = header.split(",") if header else None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(log_dir=str(self.run_dir / "tb"))
            except Exception as e:  # noqa: BLE001 - tensorboard is optional
                print(f"[mam2_fast] TensorBoard disabled ({type(e).__name__}: {e})", file=sys.stderr)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._csv_fields is None:
            self._csv_fields = list(record)
            with open(self.csv_path, "w", newline="") as f:
                csv.writer(f).writerow(self._csv_fields)
        with open(self.csv_path, "a", newline="") as f:
            csv.writer(f).writerow([record.get(k, "") for k in self._csv_fields])
        if self.tb is not None:
            step = int(record.get("step", 0))
            for k, v in record.items():
                if k not in ("step", "time", "epoch") and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class Progress:
    """A one-line progress display: step, loss terms, clips/s and ETA."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True):
        self.total, self.start, self.enabled = total, start, enabled
        self.t0 = time.time()
        self.tty = sys.stderr.isatty()

    def update(self, step: int, text: str, clips_per_s: float) -> None:
        if not self.enabled:
            return
        done = step - self.start
        elapsed = time.time() - self.t0
        eta = elapsed / max(done, 1) * (self.total - step)
        pct = 100.0 * step / max(self.total, 1)
        line = (f"step {step}/{self.total} ({pct:5.1f}%) | {text} | {clips_per_s:7.1f} clips/s "
                f"| ETA {_fmt(eta)}")
        if self.tty:
            sys.stderr.write("\r" + line.ljust(120))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")


def _fmt(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"
