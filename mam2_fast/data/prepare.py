"""Dataset converters: official Kinetics-400 / Something-Something V2 label files -> VideoMAE
list files (``path label``), optionally re-encoding every video to a short side.

    python -m mam2_fast.data.prepare k400 --csv kinetics_400_train.csv --csv kinetics_400_val.csv \\
        --videos /data/k400 --out /data/k400/lists [--short-side 320 --resized /data/k400_320]
    python -m mam2_fast.data.prepare ssv2 --labels something-something-v2-labels.json \\
        --split train=something-something-v2-train.json --split val=something-something-v2-validation.json \\
        --videos /data/ssv2/20bn-something-something-v2 --out /data/ssv2/lists [--short-side 320 ...]

Inputs: K400 CSVs (``label,youtube_id,time_start,time_end,split``; clip files
``{youtube_id}_{start:06d}_{end:06d}.mp4``; class index = position in the sorted class names
of the first CSV, so every split shares one encoding); SSv2 ``labels.json`` (name -> id) and
split JSONs (class = ``template`` without brackets; files ``{id}.webm``). Videos are found
anywhere under ``--videos`` (searched by file name, so ``train/``, ``val/`` or per-class
folders all work).

Outputs in ``--out``: one list per split (``train.txt``, ``val.txt``, ...; for K400 named
after the CSV's ``split`` column), absolute paths; ``labels.json`` (``{"names": [...]}``,
read by evaluation reports); ``bad_files.txt`` (``split<TAB>file<TAB>reason`` for every
missing or unreadable video; those are left out of the lists); ``summary.json``.

``--short-side S`` re-encodes each video (PyAV, H.264 in ``.mp4``, every frame kept, same
frame rate, no audio) so that its shorter side is ``S`` (VideoMAE's recipe uses 320; videos
already at most ``S`` are copied), into ``--resized`` (default ``<out>/videos``), and the
lists point there. It is resumable: an output file only appears once complete (written
under a temporary name, then renamed), and a rerun skips the files already there.
``--check`` opens every video (no resize) to report unreadable ones. Progress goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from fractions import Fraction
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from mam2_fast.data.official_lists import LabeledClip, read_k400_csv, ssv2_class_names, ssv2_entries
from mam2_fast.errors import UserError

VIDEO_EXTS = (".mp4", ".webm", ".mkv", ".avi", ".mov")


# ----------------------------------------------------------------------------------------
# per-video work (runs in worker processes)
# ----------------------------------------------------------------------------------------
def probe_video(path: str) -> Tuple[bool, str]:
    """(readable, reason): the container opens, has a video stream and a first frame decodes."""
    import av
    try:
        with av.open(path) as c:
            if not c.streams.video:
                return False, "no video stream"
            for _ in c.decode(video=0):
                return True, ""
            return False, "no decodable frame"
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad file
        return False, f"{type(e).__name__}: {str(e)[:160]}"


def _even(x: float) -> int:
    return max(2, int(round(x / 2.0)) * 2)


def copy_target(src: str, dst: str) -> str:
    """Where a video already small enough is copied: ``dst`` with the source's extension."""
    return os.path.splitext(dst)[0] + os.path.splitext(src)[1]


def resize_video(src: str, dst: str, short_side: int, crf: int = 23, threads: int = 1) -> Tuple[bool, str, str]:
    """Re-encode ``src`` so its shorter side is ``short_side`` into ``dst`` (``.mp4``, H.264):
    ``(ok, reason, written path)``. Atomic (temporary name, then rename). Videos whose short
    side is already at most ``short_side`` are copied unchanged (:func:`copy_target`)."""
    import av
    tmp = f"{dst}.part{os.getpid()}"
    try:
        with av.open(src) as inp:
            if not inp.streams.video:
                return False, "no video stream", dst
            vs = inp.streams.video[0]
            vs.thread_type = "AUTO"
            w, h = vs.codec_context.width, vs.codec_context.height
            if not w or not h:
                return False, "video stream without a frame size", dst
            if min(w, h) <= short_side:
                inp.close()
                final = copy_target(src, dst)
                shutil.copyfile(src, tmp)
                os.replace(tmp, final)
                return True, "copied", final
            scale = short_side / min(w, h)
            ow, oh = (short_side, _even(h * scale)) if w <= h else (_even(w * scale), short_side)
            if w <= h:
                ow = _even(ow)
            else:
                oh = _even(oh)
            rate = vs.average_rate or vs.guessed_rate or Fraction(30)
            n = 0
            with av.open(tmp, mode="w", format="mp4") as out:
                os_ = out.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=rate)
                os_.width, os_.height, os_.pix_fmt = ow, oh, "yuv420p"
                os_.options = {"crf": str(crf), "preset": "veryfast"} if os_.codec_context.name == "libx264" else {}
                os_.codec_context.thread_count = max(1, threads)
                for frame in inp.decode(video=0):
                    img = frame.reformat(width=ow, height=oh, format="yuv420p", interpolation="AREA")
                    img.pts, img.time_base = n, 1 / Fraction(rate)
                    for pkt in os_.encode(img):
                        out.mux(pkt)
                    n += 1
                for pkt in os_.encode():
                    out.mux(pkt)
            if n == 0:
                os.remove(tmp)
                return False, "no decodable frame", dst
        os.replace(tmp, dst)
        return True, f"{w}x{h} -> {ow}x{oh}, {n} frames", dst
    except Exception as e:  # noqa: BLE001
        if os.path.exists(tmp):
            os.remove(tmp)
        return False, f"{type(e).__name__}: {str(e)[:160]}", dst


def _job(args) -> Tuple[str, bool, str, str]:
    """(key, ok, reason, final path) for one video."""
    key, src, dst, short_side, check = args
    if dst is None:
        if check:
            ok, why = probe_video(src)
            return key, ok, why, src
        return key, True, "", src
    for done in (dst, copy_target(src, dst)):
        if os.path.exists(done):
            return key, True, "done before", done
    ok, why, final = resize_video(src, dst, short_side)
    return key, ok, why, final


# ----------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------
class Progress:
    def __init__(self, total: int, what: str, stream=None, every_s: float = 2.0):
        self.total, self.what, self.stream, self.every = total, what, stream or sys.stderr, every_s
        self.done = self.bad = 0
        self.t0 = self.last = time.time()

    def step(self, ok: bool) -> None:
        self.done += 1
        self.bad += not ok
        now = time.time()
        if now - self.last >= self.every or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            print(f"[prepare] {self.what}: {self.done}/{self.total} ({100.0 * self.done / max(self.total, 1):.1f}%) "
                  f"{rate:.1f} videos/s, ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}, {self.bad} bad",
                  file=self.stream, flush=True)


def index_videos(root: str) -> Dict[str, str]:
    """file name -> path of every video under ``root`` (first found wins)."""
    found: Dict[str, str] = {}
    for d, _, files in os.walk(os.path.expanduser(root), followlinks=True):
        for f in files:
            if f.endswith(VIDEO_EXTS) and f not in found:
                found[f] = os.path.join(d, f)
    return found


def _find(index: Dict[str, str], filename: str) -> Optional[str]:
    if filename in index:
        return index[filename]
    stem = os.path.splitext(filename)[0]          # another container than the label file says
    for ext in VIDEO_EXTS:
        if stem + ext in index:
            return index[stem + ext]
    return None


def convert(splits: Dict[str, List[LabeledClip]], names: Sequence[str], videos: str, out: str,
            short_side: Optional[int] = None, resized: Optional[str] = None, workers: int = 1,
            check: bool = False, dataset: str = "", log=lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    """Write one list per split (+ labels.json, bad_files.txt, summary.json) into ``out``."""
    outp = Path(out).expanduser()
    outp.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    log(f"[prepare] indexing videos under {videos} ...")
    index = index_videos(videos)
    log(f"[prepare] {len(index)} video files found")
    if short_side is not None:
        rdir = Path(resized).expanduser() if resized else outp / "videos"
        rdir.mkdir(parents=True, exist_ok=True)
    bad: List[Tuple[str, str, str]] = []
    summary = {"dataset": dataset, "classes": len(names), "short_side": short_side, "splits": {}}
    for split, clips in splits.items():
        jobs, missing = [], 0
        for c in clips:
            src = _find(index, c.filename)
            if src is None:
                bad.append((split, c.filename, "missing"))
                missing += 1
                continue
            dst = None
            if short_side is not None:
                name = os.path.basename(src)
                dst = str(rdir / (os.path.splitext(name)[0] + ".mp4"))
            jobs.append((c.filename, src, dst, short_side, check))
        label_of = {c.filename: c.label for c in clips}
        done: Dict[str, str] = {}
        prog = Progress(len(jobs), f"{dataset} {split}")
        if workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(workers) as ex:
                results: Iterable = ex.map(_job, jobs, chunksize=4)
                for key, ok, why, path in results:
                    _collect(key, ok, why, path, split, done, bad, prog)
        else:
            for j in jobs:
                _collect(*_job(j), split, done, bad, prog)
        # list order follows the label file
        lines = [f"{done[c.filename]} {label_of[c.filename]}" for c in clips if c.filename in done]
        tmp = outp / f".{split}.txt.tmp"
        tmp.write_text("".join(line + "\n" for line in lines))
        tmp.replace(outp / f"{split}.txt")
        summary["splits"][split] = {"listed": len(lines), "in_label_file": len(clips), "missing": missing,
                                    "unreadable": len(jobs) - len(lines), "list": str(outp / f"{split}.txt")}
        log(f"[prepare] {split}: {len(lines)}/{len(clips)} videos listed -> {outp / f'{split}.txt'} "
            f"({missing} missing, {len(jobs) - len(lines)} unreadable)")
    (outp / "labels.json").write_text(json.dumps({"names": list(names), "dataset": dataset}, indent=1))
    (outp / "bad_files.txt").write_text("".join(f"{s}\t{f}\t{r}\n" for s, f, r in bad))
    summary["seconds"] = round(time.time() - t0, 1)
    (outp / "summary.json").write_text(json.dumps(summary, indent=2))
    if bad:
        log(f"[prepare] {len(bad)} bad files listed in {outp / 'bad_files.txt'}")
    return summary


def _collect(key, ok, why, path, split, done, bad, prog) -> None:
    if ok:
        done[key] = os.path.abspath(path)
    else:
        bad.append((split, key, why))
    prog.step(ok)


# ----------------------------------------------------------------------------------------
# datasets
# ----------------------------------------------------------------------------------------
def k400_splits(csvs: Sequence[str]) -> Tuple[Dict[str, List[LabeledClip]], List[str]]:
    splits: Dict[str, List[LabeledClip]] = {}
    names: Optional[List[str]] = None
    for path in csvs:
        clips, found = read_k400_csv(path, names)
        names = names or found
        for c in clips:   # the CSV's split column names the list; else the file name
            s = c.split or Path(path).stem.rsplit("_", 1)[-1]
            splits.setdefault(s, []).append(c)
    return splits, names or []


def ssv2_splits(labels: str, splits: Sequence[str]) -> Tuple[Dict[str, List[LabeledClip]], List[str]]:
    names = ssv2_class_names(labels)
    out = {}
    for spec in splits:
        name, _, path = spec.partition("=")
        if not path:
            raise UserError(f"ssv2: --split {spec!r}: expected NAME=FILE (e.g. train=something-something-v2-train.json)")
        out[name] = ssv2_entries(path, names)
    return out, names


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mam2_fast.data.prepare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="dataset", required=True)
    k = sub.add_parser("k400", help="Kinetics-400 from the official CSVs")
    k.add_argument("--csv", action="append", required=True, help="official CSV (repeat for train / val / test)")
    s = sub.add_parser("ssv2", help="Something-Something V2 from the official JSONs")
    s.add_argument("--labels", required=True, help="something-something-v2-labels.json")
    s.add_argument("--split", action="append", required=True,
                   help="NAME=FILE, e.g. train=something-something-v2-train.json (repeat)")
    for p in (k, s):
        p.add_argument("--videos", required=True, help="folder holding the videos (searched recursively)")
        p.add_argument("--out", required=True, help="output folder for the lists")
        p.add_argument("--short-side", type=int, help="re-encode to this short side (VideoMAE: 320)")
        p.add_argument("--resized", help="folder for re-encoded videos (default <out>/videos)")
        p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1) // 2))
        p.add_argument("--check", action="store_true", help="open every video to report unreadable ones")
    args = ap.parse_args(argv)
    try:
        if args.dataset == "k400":
            splits, names = k400_splits(args.csv)
        else:
            splits, names = ssv2_splits(args.labels, args.split)
        if not os.path.isdir(os.path.expanduser(args.videos)):
            raise UserError(f"{args.dataset}: videos folder not found: {args.videos}")
        if args.short_side is not None and args.short_side < 16:
            raise UserError(f"--short-side {args.short_side}: must be >= 16")
        summary = convert(splits, names, args.videos, args.out, args.short_side, args.resized, args.workers,
                          args.check, args.dataset)
    except UserError as e:
        print(f"prepare error: {e}", file=sys.stderr)
        return 2
    listed = ", ".join(f"{k} {v['listed']}" for k, v in summary["splits"].items())
    print(f"[prepare] {args.dataset}: {len(names)} classes; listed {listed} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
