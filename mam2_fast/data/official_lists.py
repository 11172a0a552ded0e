"""Official dataset label files: Kinetics-400 CSVs and Something-Something V2 JSONs.

* K400 (``kinetics_400_{train,val,test}.csv``): header ``label,youtube_id,time_start,time_end,split``
  (later releases add ``is_cc``); the clip of a row is ``{youtube_id}_{start:06d}_{end:06d}.mp4``
  (:func:`k400_filename`); class indices are the sorted class names (as in VideoMAE's lists).
* SSv2: ``something-something-v2-labels.json`` (class name -> id string) and
  ``something-something-v2-{train,validation}.json`` (lists of ``{id, label, template,
  placeholders}``); the class of an entry is its ``template`` with the brackets removed
  (``"Putting [something] on [something]"`` -> ``"Putting something on something"``); the
  video is ``{id}.webm`` (:func:`ssv2_entries`).
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from mam2_fast.errors import UserFileNotFoundError, UserValueError

K400_COLUMNS = ("label", "youtube_id", "time_start", "time_end")


@dataclass(frozen=True)
class LabeledClip:
    filename: str          # file name of the clip (no folder)
    label: int
    name: str              # class name
    line: int              # line of the label file (for messages)
    split: str = ""


def k400_filename(youtube_id: str, start, end, ext: str = ".mp4") -> str:
    return f"{youtube_id}_{int(float(start)):06d}_{int(float(end)):06d}{ext}"


def is_k400_header(line: str) -> bool:
    fields = [f.strip().strip('"').lower() for f in line.split(",")]
    return tuple(fields[:4]) == K400_COLUMNS


def read_k400_csv(path: str, class_names: Optional[List[str]] = None, ext: str = ".mp4"
                  ) -> Tuple[List[LabeledClip], List[str]]:
    """Rows of an official K400 CSV -> (clips, class names). Class indices: ``class_names``
    when given (e.g. the training CSV's, so val uses the same encoding), else this file's
    sorted names. Malformed rows raise naming the line."""
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise UserFileNotFoundError(f"k400: label file not found: {path}")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or not is_k400_header(",".join(rows[0])):
        raise UserValueError(f"k400: {path}:1: expected the header 'label,youtube_id,time_start,time_end,split'")
    header = [h.strip().lower() for h in rows[0]]
    col = {h: i for i, h in enumerate(header)}
    parsed = []
    for lineno, row in enumerate(rows[1:], 2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) < len(K400_COLUMNS):
            raise UserValueError(f"k400: {path}:{lineno}: expected {len(header)} fields, got {len(row)}")
        name = row[col["label"]].strip()
        try:
            fname = k400_filename(row[col["youtube_id"]].strip(), row[col["time_start"]], row[col["time_end"]], ext)
        except ValueError:
            raise UserValueError(f"k400: {path}:{lineno}: time_start / time_end are not numbers: {row}") from None
        split = row[col["split"]].strip() if "split" in col and col["split"] < len(row) else ""
        parsed.append((fname, name, lineno, split))
    names = list(class_names) if class_names is not None else sorted({p[1] for p in parsed})
    index = {n: i for i, n in enumerate(names)}
    clips = []
    for fname, name, lineno, split in parsed:
        if name not in index:
            raise UserValueError(f"k400: {path}:{lineno}: class {name!r} is not among the {len(names)} training classes")
        clips.append(LabeledClip(fname, index[name], name, lineno, split))
    return clips, names


def ssv2_class_names(labels_json: str) -> List[str]:
    """``something-something-v2-labels.json`` (name -> id) -> names ordered by id."""
    labels_json = os.path.expanduser(labels_json)
    if not os.path.isfile(labels_json):
        raise UserFileNotFoundError(f"ssv2: labels file not found: {labels_json}")
    with open(labels_json) as f:
        table: Dict[str, str] = json.load(f)
    try:
        by_id = {int(v): k for k, v in table.items()}
    except (TypeError, ValueError, AttributeError):
        raise UserValueError(f"ssv2: {labels_json}: expected a JSON object of class name -> id") from None
    if sorted(by_id) != list(range(len(by_id))):
        raise UserValueError(f"ssv2: {labels_json}: ids are not 0..{len(by_id) - 1}")
    return [by_id[i] for i in range(len(by_id))]


def ssv2_template_class(template: str) -> str:
    return template.replace("[", "").replace("]", "")


def ssv2_entries(split_json: str, names: List[str], ext: str = ".webm") -> List[LabeledClip]:
    """``something-something-v2-{train,validation}.json`` -> clips labelled by template."""
    split_json = os.path.expanduser(split_json)
    if not os.path.isfile(split_json):
        raise UserFileNotFoundError(f"ssv2: split file not found: {split_json}")
    with open(split_json) as f:
        entries = json.load(f)
    if not isinstance(entries, list):
        raise UserValueError(f"ssv2: {split_json}: expected a JSON list of {{id, label, template, placeholders}}")
    index = {n: i for i, n in enumerate(names)}
    out = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or "id" not in e:
            raise UserValueError(f"ssv2: {split_json}: entry {i} has no 'id'")
        if "template" not in e:
            raise UserValueError(f"ssv2: {split_json}: entry {i} (id {e['id']}) has no 'template' (the test "
                                 f"split is unlabelled)")
        name = ssv2_template_class(e["template"])
        if name not in index:
            raise UserValueError(f"ssv2: {split_json}: entry {i} (id {e['id']}): class {name!r} is not in the labels file")
        out.append(LabeledClip(f"{e['id']}{ext}", index[name], name, i + 1))
    return out


__all__ = ["LabeledClip", "k400_filename", "is_k400_header", "read_k400_csv", "ssv2_class_names",
           "ssv2_template_class", "ssv2_entries"]
