"""Charades: annotations, multi-label clip targets, per-frame targets for localization, and the mAP metrics.

Annotations (`load_charades_annotations`): the official `Charades_v1_train.csv` / `Charades_v1_test.csv` (`actions`
like `c092 11.90 21.20;c147 0.00 12.60`, `length` in seconds; the subset comes from the file name) or the original
repo's JSON `{id: {"subset": "training"|"testing", "duration": s, "actions": [[class, start, end], ...]}}`.
Subsets are called "train" and "test" here (the official test set is Charades' validation set).
Frames: `<root>/Charades_v1_rgb/<id>/<id>-000001.jpg` (24 fps) or `<root>/<id>/`, or videos `<id>.mp4` in `<root>`,
`<root>/Charades_v1_480` or `<root>/Charades_v1`.

Time and labels. Frame f of a video at `fps` shows time t = f / fps; it carries class c when start <= t <= end for one
of c's actions (both ends included, the rule of the official localization evaluation). A clip's multi-hot target is
the union of the actions overlapping its time span [t(first frame), t(last frame)]; a test view's target for
classification is the union of all the video's actions. Sampling rates are in frames of a 30-fps video by default,
as for Kinetics (rate 5 at 24 fps steps 4 source frames); `rate_fps=24` counts them in Charades' own 24-fps frames,
the unit of the original recipe (16 frames at rate 10 span 160 frames, 6.7 s). Class names come from
`Charades_v1_classes.txt` when present (`c000 Holding some clothes`), else they are the codes c000, c001, ...

Tasks. "class": train `(clip, target (K,))`, test V temporal × C spatial views `(clip, target (K,), video_index,
view_index)` (PySlowFast takes the max over views). "loc": train `(clip, target (K, T))` per sampled frame; test one
view per spatial crop covering the whole video at the sampling rate, `(clip, target (K, T_video), video_index,
view_index)` with T_video varying between videos (batch size 1, or pad). The localization protocol then scores 25
equally spaced frames per video (`localization_frame_indices`, `localization_map`): frame j·T // 25 of the sequence
stands for the official time point j·length/25, within one sampling step.
"""

import csv
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from video_dataset import AnnotationError, MissingDataError, VideoClipDataset, drop_missing
from video_io import VideoInfo

log = logging.getLogger(__name__)

NUM_CLASSES = 157
CHARADES_FPS = 24.0  # the official RGB frame dumps
MEAN, STD = (0.413, 0.368, 0.338), (0.131, 0.125, 0.132)  # Charades' own RGB statistics (the original repository's)
ORIGINAL_INPUT = {"frames": 16, "sampling_rate": 10}  # the original recipe's 160-frame window of the 24-fps frames
# What a checkpoint of the Charades recipes records beside its weights, so that predict.py reads and scores a video as
# the recipes did: sigmoid scores of the maximum logit over the views, Charades' statistics, rates in 24-fps frames.
CHECKPOINT_INPUT = {"multi_label": True, "mean": list(MEAN), "std": list(STD), "rate_fps": CHARADES_FPS}
LOCALIZATION_POINTS = 25  # frames scored per test video in the official localization evaluation
_SUBSETS = {"train": "train", "training": "train", "test": "test", "testing": "test", "val": "test",
            "validate": "test", "validation": "test"}


class CharadesVideo(NamedTuple):
    """One annotated video: its id, subset ("train" or "test"), length in seconds and (class, start, end) actions."""

    id: str
    subset: str
    length_s: float
    actions: list[tuple[int, float, float]]


# ----------------------------------------------------------------------------------------------------------------------
# Annotations
# ----------------------------------------------------------------------------------------------------------------------
def parse_actions(text: str, where: str) -> list[tuple[int, float, float]]:
    """`c092 11.90 21.20;c147 0.00 12.60` -> [(92, 11.9, 21.2), (147, 0.0, 12.6)]; `where` names the source line."""
    actions = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        fields = item.split()
        try:
            if len(fields) != 3 or not fields[0].startswith("c"):
                raise ValueError("expected `c<class> <start> <end>`")
            actions.append((int(fields[0][1:]), float(fields[1]), float(fields[2])))
        except ValueError as error:
            raise AnnotationError(f"{where}: bad action {item!r} ({error})") from error
    return actions


def _load_csv(path: Path, subset: str | None) -> list[CharadesVideo]:
    if subset is None:
        name = path.name.lower()
        subset = "test" if "test" in name else "train" if "train" in name else None
        if subset is None:
            raise ValueError(f"{path}: cannot tell train from test by the file name; pass subset=")
    videos = []
    with open(path, newline="", encoding="utf-8-sig") as f:  # spreadsheet exports start with a byte-order mark
        reader = csv.DictReader(f)
        missing = {"id", "actions", "length"}.difference(reader.fieldnames or [])
        if missing:
            raise AnnotationError(f"{path}:1: header lacks the column(s) {sorted(missing)}")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            try:
                length = float(row["length"])
            except (TypeError, ValueError) as error:
                raise AnnotationError(f"{where}: length {row['length']!r} is not a number") from error
            videos.append(CharadesVideo(row["id"], subset, length, parse_actions(row["actions"] or "", where)))
    return videos


def _load_json(path: Path) -> list[CharadesVideo]:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as error:
        raise AnnotationError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from error
    videos = []
    for vid, entry in data.items():
        try:
            actions = [(int(c), float(s), float(e)) for c, s, e in entry["actions"]]
            videos.append(CharadesVideo(vid, _SUBSETS[entry["subset"]], float(entry["duration"]), actions))
        except (KeyError, TypeError, ValueError) as error:
            raise AnnotationError(f"{path}: entry {vid!r} needs subset (training/testing), duration and actions "
                                  f"[[class, start, end], ...] ({error!r})") from error
    return videos


def load_charades_annotations(path: str | Path, subset: str | None = None) -> list[CharadesVideo]:
    """Videos of an official Charades CSV (subset from the file name unless given) or of the original repo's JSON."""
    path = Path(path)
    return _load_json(path) if path.suffix == ".json" else _load_csv(path, subset)


def read_classes(path: Path) -> list[str]:
    """Class names of `Charades_v1_classes.txt` (lines `c000 Holding some clothes`), in index order; [] without it."""
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return [line.split(" ", 1)[-1] for line in lines]


def _default_annotations(root: Path, subset: str) -> Path:
    candidates = [root / f"Charades_v1_{subset}.csv", root / "charades.json", root / "data" / "charades.json"]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise MissingDataError(f"{root}: no Charades annotations; looked for {', '.join(map(str, candidates))}")
    return found


# ----------------------------------------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------------------------------------
def _actions_tensor(actions: Sequence[tuple[int, float, float]]) -> torch.Tensor:
    return torch.tensor(actions, dtype=torch.float64).reshape(-1, 3)  # (A, 3): class, start, end


def frame_labels(actions: Sequence[tuple[int, float, float]], times: Sequence[float], num_classes: int) -> torch.Tensor:
    """(K, T) float 0/1: class c at time t when start <= t <= end for one of c's actions."""
    acts, times = _actions_tensor(actions), torch.as_tensor(times, dtype=torch.float64)
    inside = (acts[:, 1:2] <= times) & (times <= acts[:, 2:3])  # (A, T)
    out = torch.zeros(num_classes, len(times))
    return out.index_add_(0, acts[:, 0].long(), inside.float()).clamp_(max=1)


def clip_labels(actions: Sequence[tuple[int, float, float]], t_start: float, t_end: float,
                num_classes: int) -> torch.Tensor:
    """(K,) float multi-hot: the classes of the actions that overlap [t_start, t_end]."""
    acts = _actions_tensor(actions)
    overlap = (acts[:, 1] <= t_end) & (acts[:, 2] >= t_start)
    out = torch.zeros(num_classes)
    out[acts[overlap, 0].long()] = 1.0
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------------------------------
def _locate(root: Path, ids: Sequence[str]) -> dict[str, str]:
    """Video id -> its frame folder or video file, from one listing per candidate folder."""
    found: dict[str, str] = {}
    for folder, suffix in [(root / "Charades_v1_rgb", ""), (root, ""), (root / "Charades_v1_480", ".mp4"),
                           (root / "Charades_v1", ".mp4"), (root, ".mp4")]:
        names = set(os.listdir(folder)) if folder.is_dir() else set()
        for vid in ids:
            if vid not in found and vid + suffix in names:
                found[vid] = str(folder / (vid + suffix))
    return found


def dataset_options(spec: dict, backend: str, max_failure_fraction: float) -> dict:
    """The CharadesDataset options of both recipes for a resolved input `spec` (frames, rate, crops, jitter): the
    clip shape, the decoder, Charades' mean and std, and sampling rates counted in its 24-fps frames."""
    return dict(frames=spec["frames"], sampling_rate=spec["sampling_rate"], train_crop=spec["train_crop"],
                train_jitter=spec["train_jitter"], test_crop=spec["test_crop"], backend=backend,
                max_failure_fraction=max_failure_fraction, mean=MEAN, std=STD, rate_fps=CHARADES_FPS)


class CharadesDataset(VideoClipDataset):
    """Charades clips with multi-hot ("class") or per-frame ("loc") targets; see the module docstring for items."""

    def __init__(self, root: str | Path, annotations: str | Path | Sequence[CharadesVideo] | None = None,
                 split: str = "train", *, task: str = "class", num_classes: int | None = None,
                 num_temporal_views: int | None = None, frame_fps: float = CHARADES_FPS, **kwargs: Any) -> None:
        if task not in ("class", "loc"):
            raise ValueError(f"task must be 'class' or 'loc', got {task!r}")
        if split not in _SUBSETS:
            raise ValueError(f"unknown split {split!r}: use 'train' or 'test' ('val' means the test set)")
        root, subset = Path(root), _SUBSETS[split]
        if annotations is None:
            annotations = _default_annotations(root, subset)
        source = str(annotations) if isinstance(annotations, str | Path) else "annotations"
        videos = load_charades_annotations(annotations) if isinstance(annotations, str | Path) else annotations
        videos = [v for v in videos if v.subset == subset]
        if not videos:
            raise ValueError(f"{source}: no {subset} videos")
        classes = read_classes(root / "Charades_v1_classes.txt")
        if num_classes is None:  # the official list has 157 lines; generated data sets may have fewer classes
            num_classes = len(classes) or NUM_CLASSES
        classes = (classes + [f"c{c:03d}" for c in range(len(classes), num_classes)])[:num_classes]
        bad = next((v for v in videos for c, _, _ in v.actions if not 0 <= c < num_classes), None)
        if bad is not None:
            raise AnnotationError(f"{source}: video {bad.id} has a class outside 0..{num_classes - 1}")
        found = _locate(root, [v.id for v in videos])
        where = f"{source} ({subset}) under {root}"
        if kwargs.get("mode") == "test":
            # The official evaluation scores every test video: one missing on disk is scored like one that does not
            # decode (-inf, ranked last) and counts against --max-failure-fraction, so that a partial download
            # cannot report a higher mAP.
            missing = [v.id for v in videos if v.id not in found]
            if len(missing) == len(videos):
                raise MissingDataError(f"{where}: none of the {len(videos)} listed videos was found on disk")
            if missing:
                log.warning("%s: %d of %d listed videos are missing on disk and scored as videos that fail to "
                            "decode (e.g. %s)", where, len(missing), len(videos), ", ".join(missing[:5]))
            found.update({vid: str(root / "Charades_v1_rgb" / vid) for vid in missing})
        else:
            videos, missing = drop_missing(videos, [v.id in found for v in videos], where)
        if num_temporal_views is None:
            num_temporal_views = 1 if task == "loc" else 10
        if task == "loc" and kwargs.get("mode") == "test" and num_temporal_views != 1:
            raise ValueError("task 'loc' tests one whole-video view per spatial crop: use num_temporal_views=1")
        super().__init__([found[v.id] for v in videos], num_temporal_views=num_temporal_views, frame_fps=frame_fps,
                         missing=missing, **kwargs)
        self.videos, self.task, self.classes = videos, task, classes
        if self.mode == "test" and missing:
            absent = set(missing)
            for i, v in enumerate(videos):
                self.failures.failed[i] = v.id in absent
            self.failures.check()  # stop now, not after training, when too many are missing

    def target(self, video: int, indices: list[int], fps: float) -> torch.Tensor:
        actions = self.videos[video].actions
        if self.task == "loc":
            return frame_labels(actions, [i / fps for i in indices], self.num_classes)  # (K, T)
        return clip_labels(actions, indices[0] / fps, indices[-1] / fps, self.num_classes)  # (K,)

    def test_target(self, video: int, indices: list[int], fps: float) -> torch.Tensor:
        if self.task == "loc":
            return self.target(video, indices, fps)
        return clip_labels(self.videos[video].actions, -math.inf, math.inf, self.num_classes)

    def test_windows(self, video: int, info: VideoInfo) -> list[list[int]]:
        if self.task == "class":
            return super().test_windows(video, info)
        step = self.sampling_rate * info.fps / self.rate_fps  # source frames per output frame
        return [[int(i * step) for i in range(max(1, math.ceil(info.num_frames / step)))]]


# ----------------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------------
def _numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """AP of one class: sum over score thresholds of (recall gain) × precision, tied scores forming one threshold.

    ±inf are ordinary scores (equal infinities tie: a frame without a prediction scores -inf); NaN is an error.
    """
    if np.isnan(scores).any():
        raise ValueError(f"{int(np.isnan(scores).sum())} NaN scores: average precision is undefined (a diverged "
                         "model or an empty view?)")
    order = np.argsort(-scores, kind="stable")
    scores, positives = scores[order], positives[order]
    tp = np.cumsum(positives)
    seen = np.arange(1, len(scores) + 1)
    # Last position of each run of equal scores; comparing (not subtracting) keeps inf - inf = NaN out.
    last = np.r_[np.flatnonzero(scores[1:] != scores[:-1]), len(scores) - 1]
    tp, seen = tp[last], seen[last]
    return float(np.sum(np.diff(tp, prepend=0) / tp[-1] * tp / seen))


def mean_average_precision(scores: torch.Tensor | np.ndarray, targets: torch.Tensor | np.ndarray) -> float:
    """Mean AP in percent over the classes with at least one positive (sklearn's average_precision_score per class).

    scores (N, K) any monotonic score (logits, probabilities); targets (N, K) 0/1 (positive where >= 0.5).
    """
    scores, positives = _numpy(scores), _numpy(targets) >= 0.5
    if scores.ndim != 2 or scores.shape != positives.shape:
        raise ValueError(f"scores {scores.shape} and targets {positives.shape} must both be (N, K)")
    if np.isnan(scores).any():
        rows = np.flatnonzero(np.isnan(scores).any(1))
        raise ValueError(f"scores of {len(rows)} of {len(scores)} rows contain NaN (e.g. row {rows[0]}): mAP is "
                         "undefined (scikit-learn refuses them too)")
    classes = np.flatnonzero(positives.any(0))
    if len(classes) == 0:
        raise ValueError("no class has a positive target: mAP is undefined")
    return 100.0 * float(np.mean([average_precision(scores[:, c], positives[:, c]) for c in classes]))


def chance_map(targets: torch.Tensor | np.ndarray) -> float:
    """The mAP (percent) of constant scores: the mean, over the classes with a positive, of their positive rate.

    targets (N, K) 0/1 rows (videos, or the (video, frame) rows of the localization protocol). Any model that ranks
    no better than chance scores this on average; it is the baseline a result is read against.
    """
    positives = _numpy(targets) >= 0.5
    classes = positives.any(0)
    if not classes.any():
        raise ValueError("no class has a positive target: mAP is undefined")
    return 100.0 * float(positives.mean(0)[classes].mean())


def localization_frame_indices(num_frames: int, num_points: int = LOCALIZATION_POINTS) -> list[int]:
    """Indices of `num_points` equally spaced frames of a sequence: frame j·num_frames // num_points (time j·L/P)."""
    if num_frames < 1:
        raise ValueError(f"a sequence needs at least one frame, got {num_frames}")
    return [j * num_frames // num_points for j in range(num_points)]


def localization_targets(video: CharadesVideo, num_classes: int, num_points: int = LOCALIZATION_POINTS) -> torch.Tensor:
    """(K, P) ground truth of the localization protocol: the classes at times j·length/P, j = 0..P-1, from the
    annotations alone, so a video that failed to decode still counts (with -inf scores)."""
    return frame_labels(video.actions, [j * video.length_s / num_points for j in range(num_points)], num_classes)


def localization_map(logits: torch.Tensor | Sequence[torch.Tensor], targets: torch.Tensor | Sequence[torch.Tensor],
                     num_points: int = LOCALIZATION_POINTS) -> float:
    """Per-frame mAP (percent) of the localization protocol from per-frame logits and targets, (N, K, T) or a list
    of (K, T_i): `num_points` equally spaced frames of each video, pooled over all videos."""
    if len(logits) != len(targets):
        raise ValueError(f"{len(logits)} videos of logits but {len(targets)} of targets")
    picked_scores, picked_targets = [], []
    for video_logits, video_targets in zip(logits, targets):
        if video_logits.shape != video_targets.shape:
            raise ValueError(f"per-video logits {tuple(video_logits.shape)} and targets "
                             f"{tuple(video_targets.shape)} must both be (K, T)")
        frames = localization_frame_indices(video_logits.shape[-1], num_points)
        picked_scores.append(video_logits[:, frames].T)  # (K, T) -> (P, K)
        picked_targets.append(video_targets[:, frames].T)
    return mean_average_precision(torch.cat(picked_scores), torch.cat(picked_targets))
