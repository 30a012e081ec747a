"""Kinetics: annotation formats, classes, and the dataset of labelled clips.

Annotation formats, detected by `build_kinetics(root, split)` in this order:
1. `<root>/<split>.csv` or `.txt` (split `train`; `val` or `validate`): either the official CSV (header
   `label,youtube_id,time_start,time_end,split[,is_cc]`) or a list file with one `path label` per line (PySlowFast's
   format; label an integer, path relative to root or absolute; a comma may separate the two).
2. `<root>/annotations/{train,validate}.csv`: the official CSV. Videos `<youtube_id>_<start:06d>_<end:06d>.<ext>` are
   looked up under `<root>/<split dir>/` or `<root>/<split dir>/<label>/` (split dirs train | val, validate, valid).
   Classes are `labels.txt`'s, else the train CSV's labels sorted alphabetically (the order of FAIR's weights).
3. The original repo's layout: ActivityNet-style `{youtube_id: {"subset", "annotations": {"label", "segment"}}}`
   JSON (optionally under "database") in `<root>`, `<root>/annotations` or `<root>/kinetics400`, `labels.txt` (line
   number = class index) and JPEG frame folders `<label>/<ytid>_<start:06d>_<end:06d>/frame_00001.jpg` (train) or
   `<label>/<ytid>/` (val) under `<root>/{train_frames,valid_frames,train,val}`; frame folders are taken at 30 fps.
Videos listed but absent on disk are reported once (count and examples) and left out.

Clips (video_dataset.py): rates in frames of a 30-fps video, X3D's unit; frame folders are taken at 30 fps.
Training items are `(clip (C, T, H, W), label)`, test items `(clip, label, video_index, view_index)`.

Classes come from one place for both splits: `labels.txt` when there is one, else the training split's annotations
(the official CSV's sorted labels, the JSON's labels, or 0..max label of a list file). A label outside them is an
error naming the file and line, never a silently larger classifier.
"""

import csv
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from video_dataset import AnnotationError, MissingDataError, VideoClipDataset, drop_missing

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov")
SPLIT_NAMES = {"train": ("train",), "val": ("val", "validate")}
SPLIT_DIRS = {"train": ("train", "train_frames"), "val": ("val", "validate", "valid", "val_frames", "valid_frames")}
JSON_SUBSETS = {"train": ("train", "training"), "val": ("val", "validate", "validation")}
_LIST_LINE = re.compile(r"^(.*\S)[\s,]+(\d+)\s*$")  # `path label` or `path,label`


class Video(NamedTuple):
    """One dataset entry: where its frames are and its class index."""

    path: str
    label: int


# ----------------------------------------------------------------------------------------------------------------------
# Annotation files
# ----------------------------------------------------------------------------------------------------------------------
def _canonical_split(split: str) -> str:
    if split in ("val", "validate", "validation"):
        return "val"
    if split == "train":
        return "train"
    raise ValueError(f"unknown split {split!r}: use 'train' or 'val' ('validate' is accepted)")


def read_official_csv(path: str | Path, classes: Sequence[str] | None = None,
                      classes_from: str = "") -> list[tuple[str, str]]:
    """(label, clip name `<youtube_id>_<start:06d>_<end:06d>`) per row of an official Kinetics CSV.

    With `classes`, a label outside them is an error naming the line (`classes_from` says where they came from).
    """
    with open(path, newline="", encoding="utf-8-sig") as f:  # spreadsheet exports start with a byte-order mark
        reader = csv.reader(f)
        header = [c.strip() for c in next(reader, [])]
        missing = [c for c in ("label", "youtube_id", "time_start", "time_end") if c not in header]
        if missing:
            raise AnnotationError(f"{path}:1: header lacks the column(s) {missing}; got {header}")
        col = {name: i for i, name in enumerate(header)}
        rows = []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            where = f"{path}:{reader.line_num}"
            if len(row) != len(header):
                raise AnnotationError(f"{where}: expected {len(header)} columns, got {len(row)}: {row}")
            try:
                start, end = (int(float(row[col[c]])) for c in ("time_start", "time_end"))
            except ValueError as error:
                raise AnnotationError(f"{where}: time_start/time_end must be numbers ({error})") from error
            label = row[col["label"]].strip()
            if classes is not None and label not in classes:
                raise AnnotationError(f"{where}: label {label!r} is not among the {len(classes)} classes "
                                      f"({classes_from})")
            rows.append((label, f"{row[col['youtube_id']].strip()}_{start:06d}_{end:06d}"))
    return rows


def read_list_file(path: str | Path, root: str | Path, num_classes: int | None = None,
                   classes_from: str = "") -> list[Video]:
    """Entries of a `path label` list file (PySlowFast's format); relative paths are taken from `root`.

    With `num_classes`, a label outside 0..num_classes-1 is an error naming the line (`classes_from` says where the
    class count came from).
    """
    videos = []
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            match = _LIST_LINE.match(line.strip())
            if match is None:
                raise AnnotationError(f"{path}:{line_no}: expected `path label` (label a non-negative integer), "
                                      f"got {line.strip()!r}")
            label = int(match.group(2))
            if num_classes is not None and label >= num_classes:
                raise AnnotationError(f"{path}:{line_no}: label {label} is outside the {num_classes} classes "
                                      f"0..{num_classes - 1} ({classes_from})")
            videos.append(Video(os.path.join(root, match.group(1)), label))
    return videos


def read_activitynet_json(path: str | Path, split: str) -> list[tuple[str, str, str]]:
    """(label, youtube_id, clip name) of the split's entries in the original repo's ActivityNet-style JSON."""
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as error:
        raise AnnotationError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from error
    data = data.get("database", data) if isinstance(data, dict) else data
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: expected an object {{youtube_id: {{subset, annotations}}}}")
    entries = []
    for ytid, entry in data.items():
        if not isinstance(entry, dict) or entry.get("subset") not in JSON_SUBSETS[split]:
            continue
        try:
            label, (start, end) = entry["annotations"]["label"], entry["annotations"]["segment"]
            entries.append((label, ytid, f"{ytid}_{int(start):06d}_{int(end):06d}"))
        except (KeyError, TypeError, ValueError) as error:
            raise AnnotationError(f"{path}: entry {ytid!r} needs annotations.label and annotations.segment "
                                  f"[start, end] ({error!r})") from error
    return entries


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]


def _first_line(path: Path) -> str:
    with open(path, encoding="utf-8-sig") as f:
        return next((line for line in f if line.strip()), "")


def _find(root: Path, folders: Sequence[str], names: Sequence[str]) -> Path | None:
    return next((root / d / n for d in folders for n in names if (root / d / n).is_file()), None)


def index_videos(root: Path, split: str, wanted: set[str]) -> dict[str, str]:
    """Clip name -> path of the wanted clips under the split folders, at depth 1 or inside one label folder."""
    found: dict[str, str] = {}
    for folder in (root / d for d in SPLIT_DIRS[split]):
        if not folder.is_dir():
            continue
        for entry in os.scandir(folder):
            name, ext = os.path.splitext(entry.name)
            if entry.name in wanted and entry.is_dir() or name in wanted and ext.lower() in VIDEO_EXTENSIONS:
                found.setdefault(entry.name if entry.is_dir() else name, entry.path)
            elif entry.is_dir():  # a label folder
                for sub in os.scandir(entry.path):
                    name, ext = os.path.splitext(sub.name)
                    if sub.name in wanted and sub.is_dir():
                        found.setdefault(sub.name, sub.path)
                    elif name in wanted and ext.lower() in VIDEO_EXTENSIONS:
                        found.setdefault(name, sub.path)
    return found


def _official_train_csv(root: Path) -> Path | None:
    candidates = [root / "train.csv", root / "annotations" / "train.csv"]
    return next((p for p in candidates if p.is_file() and "youtube_id" in _first_line(p)), None)


def _official_videos(root: Path, csv_path: Path, split: str) -> tuple[list[Video], list[str], list[str]]:
    train_csv = csv_path if split == "train" else _official_train_csv(root)
    if (root / "labels.txt").is_file():
        classes, source = _read_lines(root / "labels.txt"), f"from {root / 'labels.txt'}"
    elif train_csv is not None:
        classes, source = sorted({label for label, _ in read_official_csv(train_csv)}), f"the labels of {train_csv}"
    else:
        log.warning("%s: no train CSV or labels.txt; classes are this split's labels", csv_path)
        classes, source = sorted({label for label, _ in read_official_csv(csv_path)}), f"the labels of {csv_path}"
    index = {c: i for i, c in enumerate(classes)}
    rows = read_official_csv(csv_path, index, source)
    found = index_videos(root, split, {name for _, name in rows})
    videos = [Video(found.get(name, str(root / split / name)), index[label]) for label, name in rows]
    return *drop_missing(videos, [name in found for _, name in rows], str(csv_path)), classes


def _list_videos(root: Path, list_path: Path, split: str) -> tuple[list[Video], list[str], list[str]]:
    if (root / "labels.txt").is_file():
        classes, source = _read_lines(root / "labels.txt"), f"from {root / 'labels.txt'}"
    else:
        # Without labels.txt the training split defines the classes, for both splits: a validation label beyond
        # them would otherwise make a bigger classifier than the one trained.
        train_list = next((p for p in (root / "train.csv", root / "train.txt") if p.is_file()), None)
        if train_list is None:
            raise MissingDataError(f"{list_path}: no labels.txt and no training list (train.csv / train.txt) in "
                                   f"{root} to take the classes from")
        labels = [v.label for v in read_list_file(train_list, root)]
        if not labels:
            raise AnnotationError(f"{train_list}: no entries")
        classes = [str(i) for i in range(max(labels) + 1)]
        source = f"0..max label of {train_list}; add labels.txt to name more"
    videos = read_list_file(list_path, root, num_classes=len(classes), classes_from=source)
    return *drop_missing(videos, [os.path.exists(v.path) for v in videos], str(list_path)), classes


def _json_videos(root: Path, json_path: Path, split: str) -> tuple[list[Video], list[str], list[str]]:
    entries = read_activitynet_json(json_path, split)
    labels_txt = next((p for p in (json_path.parent / "labels.txt", root / "labels.txt") if p.is_file()), None)
    if labels_txt:
        classes, source = _read_lines(labels_txt), str(labels_txt)
    else:  # the training split's labels, whichever split this is
        kind, train_json = find_annotations(root, "train") if split != "train" else ("json", json_path)
        if kind != "json":
            raise MissingDataError(f"{json_path}: no labels.txt and no training JSON to take the classes from")
        classes = sorted({label for label, _, _ in read_activitynet_json(train_json, "train")})
        source = f"the labels of {train_json}"
    index = {c: i for i, c in enumerate(classes)}
    unknown = next(((ytid, label) for label, ytid, _ in entries if label not in index), None)
    if unknown:
        raise AnnotationError(f"{json_path}: entry {unknown[0]!r}: label {unknown[1]!r} is not among the "
                              f"{len(classes)} classes of {source}")
    # Training clips are named with their segment, validation clips by the YouTube id alone.
    found = index_videos(root, split, {n for _, ytid, name in entries for n in (ytid, name)})
    paths = [found.get(name, found.get(ytid)) for _, ytid, name in entries]
    videos = [Video(p or str(root / name), index[label]) for (label, _, name), p in zip(entries, paths)]
    return *drop_missing(videos, [p is not None for p in paths], str(json_path)), classes


def find_annotations(root: str | Path, split: str) -> tuple[str, Path]:
    """(format, file) of the split's annotations under root: format is 'official', 'list' or 'json'."""
    root, split = Path(root), _canonical_split(split)
    if not root.is_dir():
        raise MissingDataError(f"{root}: the data root does not exist" if not root.exists() else
                               f"{root}: the data root is not a folder")
    names = SPLIT_NAMES[split]
    path = _find(root, [""], [f"{n}{ext}" for n in names for ext in (".csv", ".txt")])
    if path is not None:
        return ("official" if "youtube_id" in _first_line(path) else "list"), path
    path = _find(root, ["annotations"], [f"{n}.csv" for n in names])
    if path is not None:
        return "official", path
    path = _find(root, ["", "annotations", "kinetics400"], [f"{n}.json" for n in names])
    if path is not None:
        return "json", path
    raise MissingDataError(
        f"{root}: no annotations for split {split!r}: looked for {'/'.join(names)}.csv/.txt in the root (official "
        f"CSV or `path label` list), annotations/{names[-1]}.csv and {names[-1]}.json (+ labels.txt)")


def build_kinetics(root: str | Path, split: str, *, annotation_file: str | Path | None = None,
                   **kwargs: Any) -> "KineticsDataset":
    """A KineticsDataset from whichever annotation format `root` holds (or `annotation_file`); kwargs go to it."""
    root, split = Path(root), _canonical_split(split)
    if annotation_file is None:
        kind, path = find_annotations(root, split)
    else:
        path = Path(annotation_file)
        first = _first_line(path)
        kind = "json" if path.suffix == ".json" else "official" if "youtube_id" in first else "list"
    reader = {"official": _official_videos, "list": _list_videos, "json": _json_videos}[kind]
    videos, missing, classes = reader(root, path, split)
    log.info("Kinetics %s: %d videos, %d classes from %s (%s)", split, len(videos), len(classes), path, kind)
    return KineticsDataset(videos, classes, missing=missing, **kwargs)


class KineticsDataset(VideoClipDataset):
    """Kinetics clips: train items `(clip (C,T,H,W), label)`, test items `(clip, label, video_index, view_index)`.

    `kwargs` go to VideoClipDataset (input shape, mode, views, `missing`: listed videos absent on disk).
    """

    def __init__(self, videos: Sequence[Video], classes: Sequence[str], **kwargs: Any) -> None:
        super().__init__([v.path for v in videos], **kwargs)
        self.labels = [int(v.label) for v in videos]
        self.classes = list(classes)

    def target(self, video: int, indices: list[int], fps: float) -> int:
        return self.labels[video]

