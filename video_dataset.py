"""The generic clip dataset both datasets build on: clip sampling, multi-view testing, failure counting.

A dataset is a list of video paths (files or JPEG frame folders, see video_io.py) plus, in a subclass, the target of a
clip (kinetics_multigrid.py: a class index; charades.py: multi-hot or per-frame labels).

Sampling. Rates count frames of a video at `rate_fps` (30 by default, whatever the file's own frame rate): a clip of T
frames at rate r spans T·r/rate_fps seconds, i.e. T·r·fps/rate_fps frames of the file, and its T indices are spread
by linspace over that span (PySlowFast). Training items are drawn from a `ClipSpec` (multigrid.py's batch sampler
hands one per sample), from one torch.Generator seeded with its seed and in this order: the rate in [rate_min,
rate_max], the start (uniform over the video), the short side in the jitter range, crop y, crop x and the flip. For a
crop smaller than the base crop the jitter minimum shrinks in proportion, round(jitter_min·crop/train_crop)
(PySlowFast's multigrid rule), and JPEG frames are decoded at reduced size as long as their short side stays at least
the drawn short side. Testing: item i is video i // (V·C), temporal view k = (i % (V·C)) // C starting at
k·max(L − span, 0)/(V − 1) (the centre for V = 1), spatial crop i % C (left/centre/right; C = 1: centre). The V
windows of a video are decoded in one pass and kept for its next views.

Failures. A missing, truncated or corrupt video (`video_io.VideoReadError`) is logged once and flagged in a
shared-memory table, so `failure_count` (distinct failed videos) is the same in the main process and in every
DataLoader worker of this process; each rank flags its own. Training returns another video instead, chosen from the
sample's seed, so a resumed run sees the same replacement. Testing returns a zero clip with view_index -1, so the
evaluator can drop it and count the video's missing views. Once more than `max_failure_fraction` of the videos have
failed, the dataset raises TooManyFailuresError listing examples; the recipes also combine the flags of all ranks
(`FailureTracker.check`) after each epoch and evaluation, so the limit does not depend on the number of processes.
Videos listed in the annotations but absent on disk are left out before that (`drop_missing`), reported once and
kept in `missing` for the run's summary.
"""

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from multigrid import ClipSpec
from transforms import MEAN, STD, short_side_resize, test_clip, train_clip
from utils import UserError
from video_io import Video, VideoInfo, VideoReadError, open_video, probe

log = logging.getLogger(__name__)

TARGET_FPS = 30.0  # default unit of sampling rates: frames of a 30-fps video, whatever the file's frame rate
MAX_REPLACEMENTS = 100  # a sample gives up after this many failed replacement videos


class AnnotationError(UserError, ValueError):
    """A malformed annotation file; the message names the file and the line."""


class MissingDataError(UserError, FileNotFoundError):
    """A data root, annotation file or set of videos that is not there."""


class TooManyFailuresError(UserError, RuntimeError):
    """More videos failed to decode than --max-failure-fraction allows."""


def drop_missing(videos: list, exists: Sequence[bool], source: str) -> tuple[list, list[str]]:
    """(the videos found on disk, names of the missing ones); the missing are reported once, none found is an error."""
    kept = [v for v, ok in zip(videos, exists) if ok]
    missing = [str(getattr(v, "path", None) or getattr(v, "id", v)) for v, ok in zip(videos, exists) if not ok]
    if missing:
        log.warning("%s: %d of %d listed videos are missing on disk and left out (e.g. %s)",
                    source, len(missing), len(videos), ", ".join(missing[:5]))
    if not kept:
        raise MissingDataError(f"{source}: none of the {len(videos)} listed videos was found on disk")
    return kept, missing


# ----------------------------------------------------------------------------------------------------------------------
# Clip sampling
# ----------------------------------------------------------------------------------------------------------------------
def clip_span(frames: int, rate: int, fps: float, rate_fps: float = TARGET_FPS) -> float:
    """Length in source frames of a clip of `frames` frames at `rate` (in frames at `rate_fps`) in a video at `fps`."""
    return frames * rate * fps / rate_fps


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
    """Clip sampling for training (from ClipSpecs) and V×C-view testing; subclasses set `classes` (names, in class
    index order) and give the targets (`target`, and `test_target` / `test_windows` where testing differs)."""

    classes: list[str]

    def __init__(self, paths: Sequence[str], *, mode: str = "train", frames: int = 16, sampling_rate: int = 5,
                 train_crop: int = 224, train_jitter: tuple[int, int] = (256, 320), test_crop: int = 256,
                 num_temporal_views: int = 10, num_spatial_crops: int = 3, backend: str = "auto",
                 max_failure_fraction: float = 0.1, mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD,
                 frame_fps: float = TARGET_FPS, rate_fps: float = TARGET_FPS, flip_prob: float = 0.5,
                 missing: Sequence[str] = ()) -> None:
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
        self.rate_fps, self.flip_prob = rate_fps, flip_prob
        self.missing = list(missing)  # listed in the annotations but not on disk: left out, reported at start
        self.failures = FailureTracker(self.paths, max_failure_fraction)
        self._infos: dict[int, VideoInfo] = {}
        self._test_cache: tuple[int, torch.Tensor | None, list[list[int]], float] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_videos(self) -> int:
        return len(self.paths)

    @property
    def views_per_video(self) -> int:
        return self.num_temporal_views * self.num_spatial_crops

    def summary(self) -> str:
        """One line for the start of a run: videos, classes and the listed videos missing on disk."""
        missing = (f"{len(self.missing)} listed but missing on disk (e.g. {', '.join(self.missing[:3])})"
                   if self.missing else "none missing on disk")
        return f"{self.num_videos} videos, {self.num_classes} classes, {missing}"

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
        span = clip_span(self.frames, self.sampling_rate, info.fps, self.rate_fps)
        starts = temporal_view_starts(info.num_frames, span, self.num_temporal_views)
        return [clip_indices(s, span, self.frames, info.num_frames) for s in starts]

    # -- training ------------------------------------------------------------------------------------------------------
    def info(self, video: int, opened: Video | None = None) -> VideoInfo:
        """Frame count, fps and frame size of a video (cached per process; taken from `opened` when given)."""
        if video not in self._infos:
            self._infos[video] = opened.info if opened is not None else probe(
                self.paths[video], self.backend, fps=self.frame_fps)
        return self._infos[video]

    def open(self, video: int) -> Video:
        """The video, opened once for its info and its frames."""
        return open_video(self.paths[video], self.backend, fps=self.frame_fps)

    def _train_item(self, spec: ClipSpec) -> tuple:
        for attempt in range(MAX_REPLACEMENTS):
            if not self.failures.failed[spec.index]:  # a flagged video would only fail again
                try:
                    return self._sample_clip(spec)
                except VideoReadError as error:
                    self.failures.record(spec.index, error)
            failed = spec.index
            # The replacement depends on the seed only, so a resumed run draws the same one.
            generator = torch.Generator().manual_seed((spec.seed * 1000003 + attempt + 1) % 2**63)
            spec = spec._replace(index=_randint(0, self.num_videos - 1, generator),
                                 seed=_randint(0, 2**62, generator))
        raise RuntimeError(f"{MAX_REPLACEMENTS} videos in a row failed to decode; e.g. {self.paths[failed]}")

    def _sample_clip(self, spec: ClipSpec) -> tuple[torch.Tensor, Any]:
        generator = torch.Generator().manual_seed(spec.seed)
        rate = _randint(spec.rate_min, spec.rate_max, generator)
        with self.open(spec.index) as video:
            info = self.info(spec.index, video)
            span = clip_span(spec.frames, rate, info.fps, self.rate_fps)
            start = float(torch.rand(1, generator=generator, dtype=torch.float64)) * max(info.num_frames - span, 0.0)
            indices = clip_indices(start, span, spec.frames, info.num_frames)
            low, high = jitter_for_crop(self.train_jitter, spec.crop, self.train_crop)
            # Drawing the short side before decoding lets JPEG frames decode at the smallest size that covers it.
            side = _randint(low, high, generator)
            frames = video.read(indices, min_short_side=side)
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
                with self.open(video) as opened:
                    info = self.info(video, opened)
                    windows, fps = self.test_windows(video, info), info.fps
                    flat = [i for w in windows for i in w]
                    frames = opened.read(flat, min_short_side=self.test_crop)
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

