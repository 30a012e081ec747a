"""Kinetics dataset: the annotation formats, clip sampling, test views, failures, and tools/prepare_kinetics.py."""

import csv
import json
import logging
import math
import os
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import video_io
from kinetics_multigrid import KineticsDataset, Video, build_kinetics, find_annotations
from video_dataset import AnnotationError, ClipSpec, MissingDataError, TooManyFailuresError, jitter_for_crop
from video_io import probe

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import prepare_kinetics  # noqa: E402

PLAIN = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # clips come out as pixel / 255


def level(i: int) -> int:
    """Grey level that encodes frame index i (0..40)."""
    return 10 + 6 * i


def decode_indices(clip: torch.Tensor) -> list[int]:
    """Frame indices of a (C, T, H, W) clip made of level()-encoded frames (channel 0)."""
    return ((clip[0].mean((1, 2)) * 255 - 10) / 6).round().long().tolist()


def write_mp4(path: Path, num_frames: int, fps: int = 30, width: int = 64, height: int = 48) -> Path:
    """Lossless H.264 whose frame i is flat grey level(i)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "0", "g": "8"}
        for i in range(num_frames):
            image = np.full((height, width, 3), level(i), np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(stream.encode())
    return path


def write_frames(folder: Path, num_frames: int, name: str = "frame_{:05d}.jpg", width: int = 64,
                 height: int = 48) -> Path:
    """JPEG frames: channel 0 = level(i), channel 1 = a left-to-right ramp (tells spatial crops apart)."""
    folder.mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0, 255, width).round().astype(np.uint8)
    for i in range(num_frames):
        image = np.zeros((height, width, 3), np.uint8)
        image[..., 0] = level(i)
        image[..., 1] = ramp
        Image.fromarray(image).save(folder / name.format(i + 1), quality=100, subsampling=0)
    return folder


def write_csv(path: Path, rows: list[list], header=("label", "youtube_id", "time_start", "time_end", "split")) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def official_root(tmp_path: Path) -> Path:
    """Official CSV layout: train videos in label folders (names with spaces), val videos flat, one video missing."""
    root = tmp_path / "k400"
    train = [["zumba", "aaaaaaaaaaa", 0, 10, "train"], ["air drumming", "bbbbbbbbbbb", 5, 15, "train"],
             ["air drumming", "ccccccccccc", 7, 17, "train"], ["zumba", "missing0000", 1, 11, "train"]]
    write_csv(root / "annotations" / "train.csv", train)
    write_csv(root / "annotations" / "validate.csv", [["zumba", "ddddddddddd", 3, 13, "val"]])
    for label, ytid, start, end, _ in train[:3]:
        write_mp4(root / "train" / label / f"{ytid}_{start:06d}_{end:06d}.mp4", 40)
    write_mp4(root / "val" / "ddddddddddd_000003_000013.mp4", 40)
    return root


def dataset(videos: list[Video], **kwargs) -> KineticsDataset:
    settings = dict(frames=4, sampling_rate=2, train_crop=32, train_jitter=(36, 44), test_crop=32, **PLAIN)
    return KineticsDataset(videos, ["a", "b"], **{**settings, **kwargs})


# ----------------------------------------------------------------------------------------------------------------------
# Annotation formats
# ----------------------------------------------------------------------------------------------------------------------
def test_official_csv_layout(official_root: Path, caplog):
    with caplog.at_level(logging.WARNING):
        train = build_kinetics(official_root, "train", frames=4, sampling_rate=2, train_crop=32,
                               train_jitter=(36, 44), test_crop=32)
    assert find_annotations(official_root, "train")[0] == "official"
    assert train.classes == ["air drumming", "zumba"]
    assert train.num_videos == 3 and train.labels == [1, 0, 0]
    assert [Path(p).name for p in train.paths] == ["aaaaaaaaaaa_000000_000010.mp4", "bbbbbbbbbbb_000005_000015.mp4",
                                                   "ccccccccccc_000007_000017.mp4"]
    warnings = [r.getMessage() for r in caplog.records if "missing on disk" in r.getMessage()]
    assert len(warnings) == 1 and "1 of 4" in warnings[0] and "missing0000_000001_000011" in warnings[0]
    assert train.summary().startswith("3 videos, 2 classes, 1 listed but missing on disk (e.g. ")  # printed at start
    assert train.summary().endswith("missing0000_000001_000011)")
    val = build_kinetics(official_root, "validate", mode="test", num_temporal_views=2, num_spatial_crops=1)
    assert val.classes == train.classes and val.labels == [1] and len(val) == 2


def test_official_csv_with_a_byte_order_mark(official_root: Path):
    for name in ("train.csv", "validate.csv"):  # as a spreadsheet exports it
        path = official_root / "annotations" / name
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    train = build_kinetics(official_root, "train", frames=4, sampling_rate=2, train_crop=32, train_jitter=(36, 44))
    assert train.classes == ["air drumming", "zumba"] and train.num_videos == 3
    assert build_kinetics(official_root, "val", mode="test").labels == [1]


def test_official_csv_malformed_line_names_file_and_line(official_root: Path):
    path = official_root / "annotations" / "train.csv"
    path.write_text(path.read_text() + "zumba,eeeeeeeeeee,4\n")
    with pytest.raises(AnnotationError, match=r"train\.csv:6: expected 5 columns"):
        build_kinetics(official_root, "train")
    write_csv(path, [["zumba", "aaaaaaaaaaa", "zero", 10, "train"]])
    with pytest.raises(AnnotationError, match=r"train\.csv:2: time_start/time_end"):
        build_kinetics(official_root, "train")


def test_official_csv_classes_come_from_labels_txt_when_there_is_one(official_root: Path):
    (official_root / "labels.txt").write_text("zumba\nair drumming\nyodelling\n")  # its order, its classes
    train = build_kinetics(official_root, "train")
    assert train.classes == ["zumba", "air drumming", "yodelling"] and train.labels == [0, 1, 1]
    write_csv(official_root / "annotations" / "validate.csv", [["yodelling", "ddddddddddd", 3, 13, "val"]])
    assert build_kinetics(official_root, "val", mode="test").labels == [2]
    write_csv(official_root / "annotations" / "validate.csv", [["zumba", "ddddddddddd", 3, 13, "val"],
                                                               ["hopscotch", "eeeeeeeeeee", 3, 13, "val"]])
    with pytest.raises(AnnotationError, match=r"validate\.csv:3: label 'hopscotch' is not among the 3 classes "
                                              r"\(from .*labels\.txt\)"):
        build_kinetics(official_root, "val", mode="test")


def test_list_file_format(tmp_path: Path):
    write_mp4(tmp_path / "videos" / "one.mp4", 20)
    write_frames(tmp_path / "folders" / "two", 20)
    (tmp_path / "train.csv").write_text(f"videos/one.mp4 3\n\n{tmp_path / 'folders' / 'two'} 1\nvideos/gone.mp4 0\n")
    assert find_annotations(tmp_path, "train")[0] == "list"
    train = build_kinetics(tmp_path, "train", frames=4, sampling_rate=2, train_crop=32, train_jitter=(36, 44))
    assert train.labels == [3, 1] and train.num_classes == 4  # classes 0..max label without labels.txt
    assert train.paths == [str(tmp_path / "videos" / "one.mp4"), str(tmp_path / "folders" / "two")]
    assert train[0][0].shape == (3, 4, 32, 32) and train[1][1] == 1
    (tmp_path / "labels.txt").write_text("a\nb\nc\nd\ne\n")
    assert build_kinetics(tmp_path, "train").classes == ["a", "b", "c", "d", "e"]
    (tmp_path / "val.txt").write_text("videos/one.mp4 1\nvideos/one.mp4\n")
    with pytest.raises(AnnotationError, match=r"val\.txt:2: expected `path label`"):
        build_kinetics(tmp_path, "val")


def test_original_repo_json_layout(tmp_path: Path):
    annotations = tmp_path / "kinetics400"
    annotations.mkdir()
    (annotations / "labels.txt").write_text("air drumming\nzumba\n")
    train = {"aaaaaaaaaaa": {"subset": "train", "annotations": {"label": "zumba", "segment": [4, 14]}},
             "bbbbbbbbbbb": {"subset": "train", "annotations": {"label": "air drumming", "segment": [0.0, 10.0]}},
             "ccccccccccc": {"subset": "validate", "annotations": {"label": "zumba", "segment": [1, 11]}},
             "lostlostlos": {"subset": "train", "annotations": {"label": "zumba", "segment": [2, 12]}}}
    (annotations / "train.json").write_text(json.dumps(train))
    (annotations / "validate.json").write_text(json.dumps({"database": {k: v for k, v in train.items()
                                                                        if k.startswith("c")}}))
    write_frames(tmp_path / "train_frames" / "zumba" / "aaaaaaaaaaa_000004_000014", 12)
    write_frames(tmp_path / "train_frames" / "air_drumming" / "bbbbbbbbbbb_000000_000010", 12)
    write_frames(tmp_path / "valid_frames" / "zumba" / "ccccccccccc", 12)
    ds = build_kinetics(tmp_path, "train", frames=4, sampling_rate=2, train_crop=32, train_jitter=(36, 44))
    assert find_annotations(tmp_path, "train")[0] == "json"
    assert ds.classes == ["air drumming", "zumba"] and ds.labels == [1, 0] and ds.num_videos == 2
    assert ds.info(0).num_frames == 12 and ds.info(0).fps == 30.0
    assert ds[1][0].shape == (3, 4, 32, 32)
    val = build_kinetics(tmp_path, "val", mode="test", num_temporal_views=1, num_spatial_crops=1)
    assert val.labels == [1] and val.paths == [str(tmp_path / "valid_frames" / "zumba" / "ccccccccccc")]
    (annotations / "train.json").write_text('{"aaaaaaaaaaa": {"subset": "train",\n "annotations": {"label": }}}')
    with pytest.raises(AnnotationError, match=r"train\.json:2: not valid JSON"):
        build_kinetics(tmp_path, "train")


def test_list_file_classes_come_from_the_training_split(tmp_path: Path):
    write_mp4(tmp_path / "v.mp4", 20)
    (tmp_path / "train.txt").write_text("".join(f"v.mp4 {label}\n" for label in (0, 1, 2, 3)))
    (tmp_path / "val.txt").write_text("v.mp4 1\n")
    val = build_kinetics(tmp_path, "val", mode="test")
    assert val.num_classes == 4 and val.labels == [1]  # the training split's classes, whatever val holds
    (tmp_path / "val.txt").write_text("v.mp4 1\nv.mp4 7\n")  # a label no training video has
    with pytest.raises(AnnotationError, match=r"val\.txt:2: label 7 is outside the 4 classes 0\.\.3 \(0\.\.max "
                                              r"label of .*train\.txt; add labels\.txt to name more\)"):
        build_kinetics(tmp_path, "val", mode="test")
    (tmp_path / "labels.txt").write_text("".join(f"class {i}\n" for i in range(8)))
    assert build_kinetics(tmp_path, "val", mode="test").num_classes == 8
    assert build_kinetics(tmp_path, "train").num_classes == 8  # both splits from the one source


def test_json_validation_classes_come_from_the_training_json(tmp_path: Path):
    def entry(subset, label):
        return {"subset": subset, "annotations": {"label": label, "segment": [0, 10]}}

    (tmp_path / "train.json").write_text(json.dumps({"aaaaaaaaaaa": entry("train", "zumba"),
                                                     "bbbbbbbbbbb": entry("train", "air drumming")}))
    (tmp_path / "val.json").write_text(json.dumps({"ccccccccccc": entry("validate", "zumba")}))
    write_frames(tmp_path / "val" / "zumba" / "ccccccccccc", 12)
    val = build_kinetics(tmp_path, "val", mode="test")
    assert val.classes == ["air drumming", "zumba"] and val.labels == [1]
    (tmp_path / "val.json").write_text(json.dumps({"ccccccccccc": entry("validate", "yodelling")}))
    with pytest.raises(AnnotationError, match=r"val\.json: entry 'ccccccccccc': label 'yodelling' is not among the 2 "
                                              r"classes of the labels of .*train"):
        build_kinetics(tmp_path, "val", mode="test")


def test_no_usable_video_is_a_clear_error(tmp_path: Path):
    write_csv(tmp_path / "annotations" / "train.csv", [["zumba", "aaaaaaaaaaa", 0, 10, "train"]])
    with pytest.raises(MissingDataError, match="none of the 1 listed videos"):
        build_kinetics(tmp_path, "train")
    with pytest.raises(MissingDataError, match="no annotations for split 'val'"):
        build_kinetics(tmp_path, "val")
    with pytest.raises(MissingDataError, match="kinetics400: the data root does not exist"):
        build_kinetics(tmp_path / "kinetics400", "train")


# ----------------------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fps", [30, 15])
def test_train_clip_frames_follow_rate_and_fps(tmp_path: Path, fps: int):
    ds = dataset([Video(str(write_mp4(tmp_path / "v.mp4", 40, fps=fps)), 1)])
    spans = set()
    for seed in range(12):
        clip, label = ds[ClipSpec(0, 4, 32, 2, 3, seed)]
        assert clip.shape == (3, 4, 32, 32) and clip.dtype == torch.float32 and label == 1
        indices = decode_indices(clip)
        assert 0 <= indices[0] <= indices[-1] <= 39 and sorted(indices) == indices
        spans.add(indices[-1] - indices[0])
    # 4 frames at rate r (30-fps units) span 4·r·fps/30 source frames: linspace over [s, s + span - 1].
    assert spans == {4 * r * fps // 30 - 1 for r in (2, 3)}


def test_train_sampling_is_a_function_of_the_seed(tmp_path: Path):
    ds = dataset([Video(str(write_frames(tmp_path / "f", 40)), 0)] * 2)
    a, b = ds[ClipSpec(1, 4, 24, 2, 4, 7)][0], ds[ClipSpec(1, 4, 24, 2, 4, 7)][0]
    assert a.shape == (3, 4, 24, 24) and torch.equal(a, b)
    assert not all(torch.equal(a, ds[ClipSpec(1, 4, 24, 2, 4, s)][0]) for s in range(8, 12))
    assert torch.equal(ds[1][0], ds[ClipSpec(1, 4, 32, 2, 2, 1)][0])  # int item: base shape, seed = index


def test_a_clip_opens_its_video_once(tmp_path: Path, monkeypatch):
    """The length that places a clip and the frames it shows come from one open of the file."""
    monkeypatch.setattr(video_io, "PACKET_INDEX_BUDGET", 0)  # later reads would not open it at all (test_video_io)
    ds = dataset([Video(str(write_mp4(tmp_path / "v.mp4", 40)), 1)])
    opened = []
    real_open = av.open
    monkeypatch.setattr(av, "open", lambda *args, **kwargs: opened.append(args[0]) or real_open(*args, **kwargs))
    ds[ClipSpec(0, 4, 32, 2, 3, 5)]
    assert opened == [str(tmp_path / "v.mp4")]
    test = dataset([Video(str(tmp_path / "v.mp4"), 1)], mode="test", num_temporal_views=2, num_spatial_crops=3)
    [test[i] for i in range(len(test))]
    assert len(opened) == 2  # one more for all six views of the video


def test_scale_jitter_for_multigrid_crops():
    assert jitter_for_crop((256, 320), 224, 224) == (256, 320)
    assert jitter_for_crop((256, 320), 112, 224) == (128, 320)
    assert jitter_for_crop((256, 320), 158, 224) == (181, 320)  # PySlowFast's [181, 320] at crop 158
    assert jitter_for_crop((182, 228), 80, 160) == (91, 228)


def test_test_views_are_complete_unique_and_placed(tmp_path: Path):
    videos = [Video(str(write_frames(tmp_path / f"v{i}", n)), i % 2) for i, n in enumerate([40, 10, 25])]
    ds = dataset(videos, mode="test", num_temporal_views=3, num_spatial_crops=3, test_crop=32)
    assert len(ds) == 27
    items = [ds[i] for i in range(len(ds))]
    assert [(video, view) for _, _, video, view in items] == [(v, k) for v in range(3) for k in range(9)]
    assert [label for _, label, _, _ in items] == [0] * 9 + [1] * 9 + [0] * 9
    assert all(clip.shape == (3, 4, 32, 32) for clip, *_ in items)
    for video, length in enumerate([40, 10, 25]):
        span = 8  # 4 frames at rate 2, 30 fps
        for k in range(3):
            clips = [items[video * 9 + k * 3 + s][0] for s in range(3)]
            start = k * max(length - span, 0) / 2
            expected = [min(math.floor(start + j * (span - 1) / 3), length - 1) for j in range(4)]
            assert all(decode_indices(c) == expected for c in clips)
            ramp = [float(c[1].mean()) for c in clips]  # left < centre < right crop of the 42x32 resized frame
            assert ramp[0] < ramp[1] < ramp[2]
    centre = dataset(videos, mode="test", num_temporal_views=1, num_spatial_crops=1)
    assert len(centre) == 3 and decode_indices(centre[0][0]) == [16, 18, 20, 23]


# ----------------------------------------------------------------------------------------------------------------------
# Failures
# ----------------------------------------------------------------------------------------------------------------------
def broken_videos(tmp_path: Path, good: int = 6) -> list[Video]:
    """`good` readable videos, then a corrupt, a truncated and a to-be-deleted one."""
    videos = [Video(str(write_mp4(tmp_path / f"ok{i}.mp4", 20)), 0) for i in range(good)]
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(write_mp4(tmp_path / "full.mp4", 20).read_bytes()[:600])
    deleted = write_mp4(tmp_path / "deleted.mp4", 20)
    return videos + [Video(str(corrupt), 1), Video(str(truncated), 1), Video(str(deleted), 1)]


def test_broken_videos_are_skipped_counted_and_logged_once(tmp_path: Path, caplog):
    videos = broken_videos(tmp_path)
    ds = dataset(videos, max_failure_fraction=0.5)
    os.remove(videos[-1].path)
    with caplog.at_level(logging.WARNING):
        first = [ds[i] for i in range(len(videos))] + [ds[i] for i in range(len(videos))]
    assert all(clip.shape == (3, 4, 32, 32) and label == 0 for clip, label in first)  # replacements are good ones
    assert ds.failure_count == 3
    logged = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(logged) == 3 and all(any(Path(v.path).name in m for m in logged) for v in videos[-3:])
    fresh = dataset(videos, max_failure_fraction=0.5)
    assert torch.equal(fresh[7][0], first[7][0])  # the replacement depends on the seed only


def test_too_many_failures_stop_with_examples(tmp_path: Path):
    ds = dataset(broken_videos(tmp_path), max_failure_fraction=0.15)  # 9 videos: a second failure is too many
    with pytest.raises(RuntimeError, match=r"2 of 9 videos failed.*(corrupt|truncated|deleted)\.mp4"):
        for i in range(9):
            ds[i]


def test_failure_limit_counts_the_flags_of_all_ranks(tmp_path: Path):
    ds = dataset(broken_videos(tmp_path), max_failure_fraction=0.15)  # 9 videos: at most one may fail
    ds[6]  # this process's only failure
    assert ds.failures.check() == 1
    others = torch.zeros(9, dtype=torch.bool)
    others[[6, 7]] = True  # what the other ranks flagged, combined with ours
    with pytest.raises(TooManyFailuresError, match=r"2 of 9 videos failed.*--max-failure-fraction"):
        ds.failures.check(others)


def test_failed_test_video_gives_flagged_zero_views(tmp_path: Path):
    videos = broken_videos(tmp_path, good=2)[:3]
    ds = dataset(videos, mode="test", num_temporal_views=2, num_spatial_crops=3, max_failure_fraction=0.5)
    items = [ds[i] for i in range(len(ds))]
    assert [view for *_, view in items] == list(range(6)) * 2 + [-1] * 6
    assert all(clip.abs().sum() == 0 and label == 1 and video == 2 for clip, label, video, _ in items[12:])
    assert ds.failure_count == 1


def test_failure_count_is_shared_with_loader_workers(tmp_path: Path):
    ds = dataset(broken_videos(tmp_path), max_failure_fraction=0.5)
    loader = DataLoader(ds, batch_size=3, num_workers=2)
    labels = torch.cat([labels for _, labels in loader])
    assert len(labels) == 9 and ds.failure_count == 2  # counted in the workers; deleted.mp4 still exists here


# ----------------------------------------------------------------------------------------------------------------------
# tools/prepare_kinetics.py
# ----------------------------------------------------------------------------------------------------------------------
def test_prepare_kinetics_writes_lists_and_reencodes(official_root: Path, tmp_path: Path, capsys):
    out = tmp_path / "prepared"
    args = prepare_kinetics.get_args_parser().parse_args(
        ["--root", str(official_root), "--out", str(out), "--short-side", "32", "--workers", "1"])
    prepare_kinetics.main(args)
    assert "1 of 4" in capsys.readouterr().out  # the missing train video is reported
    assert (out / "labels.txt").read_text().splitlines() == ["air drumming", "zumba"]
    lines = (out / "train.csv").read_text().splitlines()
    assert len(lines) == 3 and lines[0].endswith(" 1") and lines[1].endswith(" 0")
    encoded = out / lines[0].rsplit(" ", 1)[0]
    info = probe(encoded)
    assert (info.num_frames, info.fps, info.height, info.width) == (40, 30.0, 32, 42)
    assert b" cabac=0 " in encoded.read_bytes() and b" deblock=0:" in encoded.read_bytes()  # --fast-decode
    index_file = Path(f"{encoded}{video_io.PACKET_INDEX_SUFFIX}")
    assert index_file.is_file()  # each output gets its packet index
    mtime = encoded.stat().st_mtime_ns
    index_file.unlink()
    prepare_kinetics.main(args)  # resumable: valid outputs are kept, and indexed where they are not yet
    assert encoded.stat().st_mtime_ns == mtime and index_file.is_file()
    ds = build_kinetics(out, "val", mode="test", num_temporal_views=1, num_spatial_crops=1, frames=4,
                        sampling_rate=2, test_crop=32, **PLAIN)
    assert ds.labels == [1] and decode_indices(ds[0][0]) == [16, 18, 20, 23]


def write_download(path: Path, num_frames: int = 40, *, rotation: int = 0, title: str | None = None) -> Path:
    """An MP4 as YouTube serves it, its index (moov) before the packets; lossless H.264 whose frame i is level(i) on
    its left half and black on its right (tells orientations apart), shown `rotation` degrees counter-clockwise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", options={"movflags": "faststart"}) as out:
        if title:
            out.metadata["title"] = title
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"crf": "0", "g": "8"}
        if rotation:
            stream.set_display_rotation(rotation)
        for i in range(num_frames):
            image = np.zeros((48, 64, 3), np.uint8)
            image[:, :32] = level(i)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(stream.encode())
    return path


def reencode_job(src: Path, dst: Path) -> tuple[Path, str | None]:
    """prepare_kinetics' worker at a short side above the source's (no scaling) and losslessly: the copy's frames
    are the source's."""
    return prepare_kinetics._reencode_job((str(src), dst, 256, 16, 0, True))


def test_prepare_kinetics_keeps_a_download_cut_short(tmp_path: Path, capsys):
    whole = write_download(tmp_path / "whole.mp4").read_bytes()
    src = tmp_path / "cut.mp4"
    src.write_bytes(whole[: len(whole) * 98 // 100])  # its last packet is cut: decoding it fails
    dst = tmp_path / "out" / "cut.mp4"
    assert reencode_job(src, dst) == (dst, None)
    num_frames = probe(dst).num_frames
    assert 36 <= num_frames < 40  # the frames before the cut are kept, as training reads them from the original
    frames = range(num_frames)
    assert torch.equal(video_io.read_frames(dst, frames), video_io.read_frames(src, frames))
    assert sorted(p.name for p in dst.parent.iterdir()) == ["cut.mp4", "cut.mp4.packets"]

    # A video none of whose packets decodes still fails, and is reported and left out of the list file.
    start = whole.index(b"mdat") + 4
    src.write_bytes(whole[:start] + b"\xff" * (len(whole) - start))
    dst = tmp_path / "out" / "garbled.mp4"
    assert prepare_kinetics.reencode_all([(str(src), dst, 256, 16, 0, True)], workers=1) == {dst}
    assert "failed: " in capsys.readouterr().out and not dst.exists()


def test_prepare_kinetics_ignores_tags_that_are_not_utf8(tmp_path: Path):
    src = write_download(tmp_path / "latin1.mp4", 8, title="cafeX")
    data = src.read_bytes()
    src.write_bytes(data.replace(b"cafeX", b"caf\xe9X"))  # "café" in Latin-1, as some uploaders' tools write it
    dst = tmp_path / "out" / "latin1.mp4"
    assert reencode_job(src, dst) == (dst, None)
    assert torch.equal(video_io.read_frames(dst, range(8)), video_io.read_frames(src, range(8)))


def test_prepare_kinetics_failed_job_leaves_no_temporary_file(tmp_path: Path):
    src = write_download(tmp_path / "video.mp4", 8)
    dst = tmp_path / "out" / "video.mp4"
    dst.mkdir(parents=True)  # a folder holds the output's name: the job fails once its temporary file is written
    dst_, problem = reencode_job(src, dst)
    assert dst_ == dst and str(src) in problem
    assert [p.name for p in dst.parent.iterdir()] == ["video.mp4"]  # tools/index_videos.py would index a .part.mp4


@pytest.mark.parametrize("backend", video_io.available_backends())
def test_prepare_kinetics_keeps_the_rotation(tmp_path: Path, backend: str):
    src = write_download(tmp_path / "phone.mp4", 8, rotation=90)
    dst = tmp_path / "out" / "phone.mp4"
    prepare_kinetics.reencode(str(src), dst, 32, 16, 0, True)
    with av.open(str(dst)) as container:
        frame = next(container.decode(video=0))
        assert (frame.rotation, frame.width, frame.height) == (90, 42, 32)  # players show it upright
    # Both backends apply the rotation: training reads the original and the copy upright, the copy's frames the
    # original's, scaled.
    original = video_io.read_frames(src, [0, 7], backend=backend).float()
    copy = video_io.read_frames(dst, [0, 7], backend=backend).float()
    assert original.shape[2:] == (64, 48) and copy.shape[2:] == (42, 32)
    scaled = torch.nn.functional.interpolate(original, size=copy.shape[2:], mode="area")
    assert (copy - scaled).abs().mean() < 2
