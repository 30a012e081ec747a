"""Kinetics: annotation formats, clip sampling for multigrid training, and the multi-view test set.

Annotation formats, detected by `build_kinetics(root, split)` in this order:
1. `<root>/<split>.csv` or `.txt` (split `train`; `val` or `validate`): either the official CSV (header
   `label,youtube_id,time_start,time_end,split[,is_cc]`) or a list file with one `path label` per line (PySlowFast's
   format; label an integer, path relative to root or absolute; a comma may separate the two).
2. `<root>/annotations/{train,validate}.csv`: the official CSV. Videos `<youtube_id>_<start:06d>_<end:06d>.<ext>` are
   looked up under `<root>/<split dir>/` or `<root>/<split dir>/<label>/` (split dirs train | val, validate, valid).
   Classes are the train CSV's labels sorted alphabetically.
3. The original repo's layout: ActivityNet-style `{youtube_id: {"subset", "annotations": {"label", "segment"}}}`
   JSON (optionally under "database") in `<root>`, `<root>/annotations` or `<root>/kinetics400`, `labels.txt` (line
   number = class index) and JPEG frame folders `<label>/<ytid>_<start:06d>_<end:06d>/frame_00001.jpg` (train) or
   `<label>/<ytid>/` (val) under `<root>/{train_frames,valid_frames,train,val}`; frame folders are taken at 30 fps.
Videos listed but absent on disk are reported once (count and examples) and left out.

Sampling (`VideoClipDataset`, shared with charades.py). Rates are in frames of a 30-fps video: a clip of T frames at
rate r spans T·r/30 seconds, i.e. T·r·fps/30 frames of the file, and its T indices are spread by linspace over that
span (PySlowFast). Training draws, from one torch.Generator seeded with the ClipSpec's seed and in this order: the
rate in [rate_min, rate_max], the start (uniform over the video), the short side in the jitter range, crop y, crop
x and the flip. For a crop smaller than the base crop the jitter minimum shrinks in proportion,
round(jitter_min·crop/train_crop) (PySlowFast's multigrid rule), and JPEG frames are decoded at reduced size as long
as their short side stays at least the drawn short side. Testing: item i is video i // (V·C), temporal view
k = (i % (V·C)) // C starting at k·max(L − span, 0)/(V − 1) (the centre for V = 1), spatial crop i % C (left/centre/
right; C = 1: centre). The V windows of a video are decoded in one pass and kept for its next views.

Classes come from one place for both splits: `labels.txt` when there is one, else the training split's annotations
(the official CSV's sorted labels, the JSON's labels, or 0..max label of a list file). A label outside them is an
error naming the file and line, never a silently larger classifier.

Failures. A missing, truncated or corrupt video (`video_io.VideoReadError`) is logged once and flagged in a
shared-memory table, so `failure_count` (distinct failed videos) is the same in the main process and in every
DataLoader worker of this process; each rank flags its own. Training returns another video instead, chosen from the
sample's seed, so a resumed run sees the same replacement. Testing returns a zero clip with view_index -1, so the
evaluator can drop it and count the video's missing views. Once more than `max_failure_fraction` of the videos have
failed, the dataset raises TooManyFailuresError listing examples; the recipes also combine the flags of all ranks
(`FailureTracker.check`) after each epoch and evaluation, so the limit does not depend on the number of processes.
"""

import csv
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import Dataset

from multigrid import ClipSpec
from transforms import MEAN, STD, short_side_resize, test_clip, train_clip
from utils import UserError
from video_io import VideoInfo, VideoReadError, probe, read_frames

log = logging.getLogger(__name__)

TARGET_FPS = 30.0  # sampling rates count frames of a 30-fps video, whatever the file's frame rate
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov")
SPLIT_NAMES = {"train": ("train",), "val": ("val", "validate")}
SPLIT_DIRS = {"train": ("train", "train_frames"), "val": ("val", "validate", "valid", "val_frames", "valid_frames")}
JSON_SUBSETS = {"train": ("train", "training"), "val": ("val", "validate", "validation")}
MAX_REPLACEMENTS = 100  # a sample gives up after this many failed replacement videos
_LIST_LINE = re.compile(r"^(.*\S)[\s,]+(\d+)\s*$")  # `path label` or `path,label`


class AnnotationError(UserError, ValueError):
    """A malformed annotation file; the message names the file and the line."""


class MissingDataError(UserError, FileNotFoundError):
    """A data root, annotation file or set of videos that is not there."""


class TooManyFailuresError(UserError, RuntimeError):
    """More videos failed to decode than --max-failure-fraction allows."""


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


def read_official_csv(path: str | Path) -> list[tuple[str, str]]:
    """(label, clip name `<youtube_id>_<start:06d>_<end:06d>`) per row of an official Kinetics CSV."""
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
            rows.append((row[col["label"]].strip(), f"{row[col['youtube_id']].strip()}_{start:06d}_{end:06d}"))
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


def drop_missing(videos: list, exists: Sequence[bool], source: str) -> list:
    """Keep the videos found on disk; report the missing ones once, and fail if none is left."""
    kept = [v for v, ok in zip(videos, exists) if ok]
    missing = [v for v, ok in zip(videos, exists) if not ok]
    if missing:
        examples = ", ".join(str(getattr(v, "path", v)) for v in missing[:5])
        log.warning("%s: %d of %d listed videos are missing on disk and left out (e.g. %s)",
                    source, len(missing), len(videos), examples)
    if not kept:
        raise MissingDataError(f"{source}: none of the {len(videos)} listed videos was found on disk")
    return kept


def _official_train_csv(root: Path) -> Path | None:
    candidates = [root / "train.csv", root / "annotations" / "train.csv"]
    return next((p for p in candidates if p.is_file() and "youtube_id" in _first_line(p)), None)


def _official_videos(root: Path, csv_path: Path, split: str) -> tuple[list[Video], list[str]]:
    train_csv = csv_path if split == "train" else _official_train_csv(root)
    if train_csv is not None:
        classes = sorted({label for label, _ in read_official_csv(train_csv)})
    elif (root / "labels.txt").is_file():
        classes = _read_lines(root / "labels.txt")
    else:
        log.warning("%s: no train CSV or labels.txt; classes are this split's labels", csv_path)
        classes = sorted({label for label, _ in read_official_csv(csv_path)})
    index = {c: i for i, c in enumerate(classes)}
    rows = read_official_csv(csv_path)
    unknown = sorted({label for label, _ in rows if label not in index})
    if unknown:
        raise AnnotationError(f"{csv_path}: labels not among the {len(classes)} classes: {unknown[:5]}")
    found = index_videos(root, split, {name for _, name in rows})
    videos = [Video(found.get(name, str(root / split / name)), index[label]) for label, name in rows]
    return drop_missing(videos, [name in found for _, name in rows], str(csv_path)), classes


def _list_videos(root: Path, list_path: Path, split: str) -> tuple[list[Video], list[str]]:
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
    return drop_missing(videos, [os.path.exists(v.path) for v in videos], str(list_path)), classes


def _json_videos(root: Path, json_path: Path, split: str) -> tuple[list[Video], list[str]]:
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
    unknown = sorted({label for label, _, _ in entries if label not in index})
    if unknown:
        raise AnnotationError(f"{json_path}: labels not among the {len(classes)} classes of {source}: {unknown[:5]}")
    # Training clips are named with their segment, validation clips by the YouTube id alone.
    found = index_videos(root, split, {n for _, ytid, name in entries for n in (ytid, name)})
    paths = [found.get(name, found.get(ytid)) for _, ytid, name in entries]
    videos = [Video(p or str(root / name), index[label]) for (label, _, name), p in zip(entries, paths)]
    return drop_missing(videos, [p is not None for p in paths], str(json_path)), classes


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
    videos, classes = reader(root, path, split)
    log.info("Kinetics %s: %d videos, %d classes from %s (%s)", split, len(videos), len(classes), path, kind)
    return KineticsDataset(videos, classes, **kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Clip sampling
# ----------------------------------------------------------------------------------------------------------------------
def clip_span(frames: int, rate: int, fps: float) -> float:
    """Length in source frames of a clip of `frames` frames at `rate` (30-fps units) in a video at `fps`."""
    return frames * rate * fps / TARGET_FPS


def clip_indices(start: float, span: float, frames: int, num_frames: int) -> list[int]:
    """`frames` indices spread by linspace over [start, start + span - 1], clamped to the video, floored."""
    points = torch.linspace(start, start + span - 1, frames, dtype=torch.float64)
    return points.clamp(0, num_frames - 1).floor().long().tolist()


def temporal_view_starts(num_frames: int, span: float, views: int) -> list[float]:
    """Start of each of `views` evenly spaced windows of length `span` (the centre window for one view)."""
    room = max(num_frames - span, 0.0)
    return [room / 2] if views == 1 else [k * room / (views - 1) for k in range(views)]


def jitter_for_crop(jitter: tuple[int, int], crop: int, train_crop: int) -> tuple[int, int]:
    """Short-side range for a multigrid crop: the minimum shrinks with the crop, the maximum stays."""
    low = round(jitter[0] * crop / train_crop)
    return low, max(low, jitter[1])


def _randint(low: int, high: int, generator: torch.Generator) -> int:
    return int(torch.randint(low, high + 1, (1,), generator=generator))


class FailureTracker:
    """Failed videos flagged in shared memory (visible to all DataLoader workers); raises past the allowed share."""

    def __init__(self, paths: Sequence[str], max_fraction: float) -> None:
        self.paths = paths
        self.max_fraction = max_fraction
        self.failed = torch.zeros(len(paths), dtype=torch.bool).share_memory_()

    def record(self, index: int, error: Exception) -> None:
        """Log a failure the first time a video fails, then stop if too many have failed."""
        if not self.failed[index]:
            self.failed[index] = True
            log.warning("skipping unreadable video: %s", error)
        self.check()

    def check(self, failed: torch.Tensor | None = None) -> int:
        """Raise TooManyFailuresError past the allowed share; `failed`: flags combined over ranks (default: own).

        Returns the number of failed videos. This process's own count never exceeds the combined one, so stopping on
        it alone is never wrong, only possibly late: the recipes call this with all ranks' flags as well.
        """
        failed = self.failed if failed is None else failed
        count = int(failed.sum())
        if count > self.max_fraction * len(self.paths):
            examples = ", ".join(self.paths[i] for i in failed.nonzero().flatten()[:5].tolist())
            raise TooManyFailuresError(
                f"{count} of {len(self.paths)} videos failed to decode, more than the allowed {self.max_fraction:.1%} "
                f"(--max-failure-fraction); e.g. {examples}")
        return count

    @property
    def count(self) -> int:
        """Distinct videos flagged as failed."""
        return int(self.failed.sum())


class VideoClipDataset(Dataset):
    """Clip sampling for training (from ClipSpecs) and V×C-view testing; subclasses give the targets."""

    def __init__(self, paths: Sequence[str], *, mode: str = "train", frames: int = 16, sampling_rate: int = 5,
                 train_crop: int = 224, train_jitter: tuple[int, int] = (256, 320), test_crop: int = 256,
                 num_temporal_views: int = 10, num_spatial_crops: int = 3, backend: str = "auto",
                 max_failure_fraction: float = 0.1, mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD,
                 frame_fps: float = TARGET_FPS, flip_prob: float = 0.5) -> None:
        if mode not in ("train", "test"):
            raise ValueError(f"mode must be 'train' or 'test', got {mode!r}")
        if num_spatial_crops not in (1, 3):
            raise ValueError(f"num_spatial_crops must be 1 (centre) or 3 (left/centre/right), got {num_spatial_crops}")
        if num_temporal_views < 1:
            raise ValueError(f"num_temporal_views must be >= 1, got {num_temporal_views}")
        self.paths = list(paths)
        self.mode, self.frames, self.sampling_rate = mode, frames, sampling_rate
        self.train_crop, self.train_jitter, self.test_crop = train_crop, tuple(train_jitter), test_crop
        self.num_temporal_views, self.num_spatial_crops = num_temporal_views, num_spatial_crops
        self.backend, self.mean, self.std, self.frame_fps = backend, tuple(mean), tuple(std), frame_fps
        self.flip_prob = flip_prob
        self.failures = FailureTracker(self.paths, max_failure_fraction)
        self._infos: dict[int, VideoInfo] = {}
        self._test_cache: tuple[int, torch.Tensor | None, list[list[int]], float] | None = None

    @property
    def num_videos(self) -> int:
        return len(self.paths)

    @property
    def views_per_video(self) -> int:
        return self.num_temporal_views * self.num_spatial_crops

    @property
    def failure_count(self) -> int:
        """Distinct videos that failed to decode in this process and its DataLoader workers (not other ranks)."""
        return self.failures.count

    def __len__(self) -> int:
        return self.num_videos if self.mode == "train" else self.num_videos * self.views_per_video

    def __getitem__(self, item: int | ClipSpec) -> tuple:
        if self.mode == "test":
            return self._test_item(int(item))
        spec = item if isinstance(item, ClipSpec) else ClipSpec(
            int(item), self.frames, self.train_crop, self.sampling_rate, self.sampling_rate, int(item))
        return self._train_item(spec)

    # -- per-dataset hooks ---------------------------------------------------------------------------------------------
    def target(self, video: int, indices: list[int], fps: float) -> Any:
        """Training target of a clip made of frames `indices` of `video`."""
        raise NotImplementedError

    def test_target(self, video: int, indices: list[int], fps: float) -> Any:
        """Test target of a view (the video's label by default, whatever the frames)."""
        return self.target(video, indices, fps)

    def test_windows(self, video: int, info: VideoInfo) -> list[list[int]]:
        """Frame indices of each temporal test view: V evenly spaced clips at the base rate."""
        span = clip_span(self.frames, self.sampling_rate, info.fps)
        starts = temporal_view_starts(info.num_frames, span, self.num_temporal_views)
        return [clip_indices(s, span, self.frames, info.num_frames) for s in starts]

    # -- training ------------------------------------------------------------------------------------------------------
    def info(self, video: int) -> VideoInfo:
        """Frame count and fps of a video (cached per process)."""
        if video not in self._infos:
            self._infos[video] = probe(self.paths[video], self.backend, fps=self.frame_fps)
        return self._infos[video]

    def _train_item(self, spec: ClipSpec) -> tuple:
        for attempt in range(MAX_REPLACEMENTS):
            if not self.failures.failed[spec.index]:  # a flagged video would only fail again
                try:
                    return self._sample_clip(spec)
                except VideoReadError as error:
                    self.failures.record(spec.index, error)
            # The replacement depends on the seed only, so a resumed run draws the same one.
            generator = torch.Generator().manual_seed((spec.seed * 1000003 + attempt + 1) % 2**63)
            spec = spec._replace(index=_randint(0, self.num_videos - 1, generator),
                                 seed=_randint(0, 2**62, generator))
        raise RuntimeError(f"{MAX_REPLACEMENTS} videos in a row failed to decode; e.g. {self.paths[spec.index]}")

    def _sample_clip(self, spec: ClipSpec) -> tuple[torch.Tensor, Any]:
        generator = torch.Generator().manual_seed(spec.seed)
        rate = _randint(spec.rate_min, spec.rate_max, generator)
        info = self.info(spec.index)
        span = clip_span(spec.frames, rate, info.fps)
        start = float(torch.rand(1, generator=generator, dtype=torch.float64)) * max(info.num_frames - span, 0.0)
        indices = clip_indices(start, span, spec.frames, info.num_frames)
        low, high = jitter_for_crop(self.train_jitter, spec.crop, self.train_crop)
        # Drawing the short side before decoding lets JPEG frames decode at the smallest size that still covers it.
        side = _randint(low, high, generator)
        frames = read_frames(self.paths[spec.index], indices, backend=self.backend, min_short_side=side)
        clip = train_clip(frames, spec.crop, (side, side), generator, self.mean, self.std, self.flip_prob)
        return clip, self.target(spec.index, indices, info.fps)

    # -- testing -------------------------------------------------------------------------------------------------------
    def _decode_test_windows(self, video: int) -> tuple[torch.Tensor | None, list[list[int]], float]:
        """All temporal views of a video, short side resized to the test crop, decoded once for its V·C views."""
        if self._test_cache is not None and self._test_cache[0] == video:
            return self._test_cache[1:]
        frames, windows, fps = None, [], self.frame_fps
        if not self.failures.failed[video]:
            try:
                info = self.info(video)
                windows, fps = self.test_windows(video, info), info.fps
                flat = [i for w in windows for i in w]
                frames = read_frames(self.paths[video], flat, backend=self.backend, min_short_side=self.test_crop)
                frames = short_side_resize(frames, self.test_crop)  # (V·T, C, H', W'), resized once for all crops
            except VideoReadError as error:
                self.failures.record(video, error)
                frames = None
        self._test_cache = (video, frames, windows, fps)
        return frames, windows, fps

    def _test_item(self, item: int) -> tuple[torch.Tensor, Any, int, int]:
        if not 0 <= item < len(self):
            raise IndexError(f"test item {item} out of range for {len(self)} views")
        video, view = divmod(item, self.views_per_video)
        k, spatial = divmod(view, self.num_spatial_crops)
        frames, windows, fps = self._decode_test_windows(video)
        if frames is None:  # unreadable video: a zero clip flagged by view index -1
            length = self.frames
            clip = torch.zeros(3, length, self.test_crop, self.test_crop)
            return clip, self.test_target(video, list(range(length)), fps), video, -1
        start = sum(len(w) for w in windows[:k])
        clip = frames[start : start + len(windows[k])]
        clip = test_clip(clip, self.test_crop, spatial if self.num_spatial_crops == 3 else None, self.mean, self.std)
        return clip, self.test_target(video, windows[k], fps), video, view


class KineticsDataset(VideoClipDataset):
    """Kinetics clips: train items `(clip (C,T,H,W), label)`, test items `(clip, label, video_index, view_index)`."""

    def __init__(self, videos: Sequence[Video], classes: Sequence[str], **kwargs: Any) -> None:
        super().__init__([v.path for v in videos], **kwargs)
        self.labels = [int(v.label) for v in videos]
        self.classes = list(classes)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def target(self, video: int, indices: list[int], fps: float) -> int:
        return self.labels[video]

