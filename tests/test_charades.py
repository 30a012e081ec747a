"""Charades: the real annotation JSON, official CSVs, clip and per-frame targets, test views, mAP and localization."""

import csv
import math
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score

from charades import (
    CharadesDataset,
    CharadesVideo,
    average_precision,
    chance_map,
    clip_labels,
    frame_labels,
    load_charades_annotations,
    localization_frame_indices,
    localization_map,
    mean_average_precision,
)
from video_dataset import AnnotationError, ClipSpec, TooManyFailuresError

REAL_JSON = Path("/work/shared/data/charades.json")
if not REAL_JSON.is_file():  # the repository's own copy, when the shared one is not mounted
    REAL_JSON = Path(__file__).resolve().parents[1] / "data" / "charades.json"
COLUMNS = ["id", "subject", "scene", "quality", "relevance", "verified", "script", "objects", "descriptions",
           "actions", "length"]
PLAIN = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # clips come out as pixel / 255
# 40 frames at 24 fps = 1.67 s; class 4 never happens inside the video.
ACTIONS = {"AAAAA": [(1, 0.0, 0.5), (3, 1.0, 2.0), (4, 3.0, 4.0)], "BBBBB": [], "CCCCC": [(0, 0.2, 0.5)]}


def level(i: int) -> int:
    return 10 + 6 * i


def decode_indices(clip: torch.Tensor) -> list[int]:
    return ((clip[0].mean((1, 2)) * 255 - 10) / 6).round().long().tolist()


def write_frames(folder: Path, vid: str, num_frames: int = 40) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(num_frames):
        Image.new("RGB", (64, 48), (level(i),) * 3).save(folder / f"{vid}-{i + 1:06d}.jpg", quality=100)


def write_mp4(path: Path, num_frames: int = 40, fps: int = 24) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"crf": "0"}
        for i in range(num_frames):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), level(i), np.uint8), "rgb24")))
        out.mux(stream.encode())


def write_csv(path: Path, rows: dict[str, list], length: float = 40 / 24) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for vid, actions in rows.items():
            text = ";".join(f"c{c:03d} {s:.2f} {e:.2f}" for c, s, e in actions)
            writer.writerow({**dict.fromkeys(COLUMNS, "x"), "id": vid, "actions": text, "length": f"{length:.2f}"})
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """Frames for AAAAA and BBBBB (train), a 24-fps mp4 for CCCCC (test), and a train video missing on disk."""
    write_frames(tmp_path / "Charades_v1_rgb" / "AAAAA", "AAAAA")
    write_frames(tmp_path / "Charades_v1_rgb" / "BBBBB", "BBBBB")
    write_mp4(tmp_path / "Charades_v1_480" / "CCCCC.mp4")
    write_csv(tmp_path / "Charades_v1_train.csv", {**{k: ACTIONS[k] for k in ("AAAAA", "BBBBB")}, "ZZZZZ": []})
    write_csv(tmp_path / "Charades_v1_test.csv", {"CCCCC": ACTIONS["CCCCC"]})
    return tmp_path


def dataset(root: Path, split: str = "train", **kwargs) -> CharadesDataset:
    settings = dict(num_classes=5, frames=4, sampling_rate=6, train_crop=32, train_jitter=(36, 44), test_crop=32)
    return CharadesDataset(root, None, split, **{**settings, **PLAIN, **kwargs})


# ----------------------------------------------------------------------------------------------------------------------
# Annotations
# ----------------------------------------------------------------------------------------------------------------------
def test_real_charades_json_loads():
    videos = load_charades_annotations(REAL_JSON)
    assert sum(v.subset == "train" for v in videos) == 7985
    assert sum(v.subset == "test" for v in videos) == 1863
    assert sum(not v.actions for v in videos) == 223
    assert {c for v in videos for c, _, _ in v.actions} == set(range(157))
    first = next(v for v in videos if v.id == "7UPGT")
    assert first.length_s == 23.21 and first.actions[0] == (149, 16.0, 22.2)


def test_official_csv_parses_and_names_bad_lines(root: Path):
    videos = load_charades_annotations(root / "Charades_v1_train.csv")
    assert [v.id for v in videos] == ["AAAAA", "BBBBB", "ZZZZZ"] and {v.subset for v in videos} == {"train"}
    assert videos[0].actions == ACTIONS["AAAAA"] and videos[1].actions == []
    assert videos[0].length_s == pytest.approx(1.67)
    assert load_charades_annotations(root / "Charades_v1_test.csv")[0].subset == "test"
    bad = root / "Charades_v1_test.csv"
    bad.write_text(bad.read_text() + "DDDDD,x,x,x,x,x,x,x,x,c001 1.0;c002 0.0 1.0,3.0\n")
    with pytest.raises(AnnotationError, match=r"Charades_v1_test\.csv:3: bad action 'c001 1.0'"):
        load_charades_annotations(bad)
    bad.write_text("id,actions\nAAAAA,\n")
    with pytest.raises(AnnotationError, match=r"Charades_v1_test\.csv:1: header lacks the column\(s\) \['length'\]"):
        load_charades_annotations(bad)


# ----------------------------------------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------------------------------------
def test_frame_and_clip_label_boundaries():
    actions = [(2, 1.0, 2.0), (0, 0.0, 0.5)]
    labels = frame_labels(actions, [0.5, 0.51, 1.0, 1.5, 2.0, 2.01], num_classes=3)
    assert labels.tolist() == [[1, 0, 0, 0, 0, 0], [0] * 6, [0, 0, 1, 1, 1, 0]]  # start <= t <= end
    assert clip_labels(actions, 0.6, 0.9, 3).tolist() == [0, 0, 0]
    assert clip_labels(actions, 0.5, 0.5, 3).tolist() == [1, 0, 0]
    assert clip_labels(actions, 0.2, 1.0, 3).tolist() == [1, 0, 1]
    assert frame_labels([], [0.0, 1.0], 3).shape == (3, 2) and clip_labels([], 0, 9, 3).sum() == 0


def test_train_targets_match_the_sampled_frames(root: Path):
    classes, per_frame = dataset(root, task="class"), dataset(root, task="loc")
    assert classes.num_videos == 2  # ZZZZZ is missing on disk
    seen = set()
    for seed in range(16):
        spec = ClipSpec(0, 4, 32, 4, 8, seed)
        clip, target = classes[spec]
        assert clip.shape == (3, 4, 32, 32) and target.shape == (5,)
        times = [i / 24 for i in decode_indices(clip)]
        expected = [float(any(c == k and s <= times[-1] and e >= times[0] for c, s, e in ACTIONS["AAAAA"]))
                    for k in range(5)]
        assert target.tolist() == expected
        seen.add(tuple(expected))
        loc_clip, loc_target = per_frame[spec]
        assert torch.equal(loc_clip, clip) and loc_target.shape == (5, 4)
        assert loc_target.tolist() == [[float(any(c == k and s <= t <= e for c, s, e in ACTIONS["AAAAA"]))
                                        for t in times] for k in range(5)]
    assert len(seen) >= 2  # clips at different times got different labels
    assert classes[1][1].sum() == 0  # a video without actions


def test_test_views(root: Path):
    ds = dataset(root, "test", mode="test", num_temporal_views=2, num_spatial_crops=3)
    assert len(ds) == 6 and ds.info(0).fps == 24.0  # the mp4 in Charades_v1_480
    items = [ds[i] for i in range(6)]
    assert [(video, view) for _, _, video, view in items] == [(0, k) for k in range(6)]
    # The whole video's actions, also for the second view, which starts after the action (0.87 s > 0.5 s).
    assert all(target.tolist() == [1, 0, 0, 0, 0] for _, target, _, _ in items)
    # 4 frames at rate 6 (30-fps units) span 19.2 frames at 24 fps; two views: start and end of the video.
    assert decode_indices(items[0][0]) == [0, 6, 12, 18] and decode_indices(items[3][0]) == [20, 26, 32, 39]
    loc = dataset(root, "test", mode="test", task="loc", sampling_rate=5)
    clip, target, video, view = loc[0]
    assert decode_indices(clip) == list(range(0, 40, 4))  # whole video, 4 source frames per output frame
    assert target.shape == (5, 10) and target[0].tolist() == [0, 0, 1, 1, 0, 0, 0, 0, 0, 0]  # 0.2 s .. 0.5 s
    with pytest.raises(ValueError, match="num_temporal_views=1"):
        dataset(root, "test", mode="test", task="loc", num_temporal_views=3)


def test_annotations_from_json_and_class_count(root: Path):
    videos = [CharadesVideo("AAAAA", "train", 1.67, [(156, 0.0, 1.0)])]
    ds = CharadesDataset(root, videos, "train", frames=4, sampling_rate=6, train_crop=32, train_jitter=(36, 44))
    assert ds.num_classes == 157 and ds[0][1].shape == (157,) and ds[0][1][156] == 1
    (root / "Charades_v1_classes.txt").write_text("".join(f"c{i:03d} thing {i}\n" for i in range(5)))
    assert CharadesDataset(root, None, "train").num_classes == 5
    with pytest.raises(AnnotationError, match="class outside 0..4"):
        CharadesDataset(root, videos, "train")


# ----------------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------------
def sklearn_map(scores: np.ndarray, targets: np.ndarray) -> float:
    keep = targets.any(0)
    return 100 * float(np.mean(average_precision_score(targets[:, keep], scores[:, keep], average=None)))


def test_mean_average_precision_matches_sklearn():
    rng = np.random.default_rng(0)
    for trial in range(5):
        targets = (rng.random((60, 8)) < 0.2).astype(np.float64)
        targets[:, 3] = 0  # a class without positives is left out
        scores = rng.normal(size=(60, 8)).round(trial)  # rounding to 0..4 decimals makes ties
        expected = sklearn_map(scores, targets)
        assert mean_average_precision(scores, targets) == pytest.approx(expected, abs=1e-9)
        assert mean_average_precision(torch.from_numpy(scores).float(), torch.from_numpy(targets)) == pytest.approx(
            expected, abs=1e-4)
    assert mean_average_precision(np.array([[0.9], [0.8], [0.1]]), np.array([[0], [1], [1]])) == pytest.approx(
        100 * (1 / 2 + 2 / 3) / 2)
    with pytest.raises(ValueError, match="no class has a positive"):
        mean_average_precision(np.ones((3, 2)), np.zeros((3, 2)))


def test_map_refuses_nan_and_ties_infinite_scores():
    targets = np.array([[1.0], [0.0], [1.0]])
    with pytest.raises(ValueError, match="NaN"):
        mean_average_precision(np.array([[0.9], [np.nan], [0.1]]), targets)
    with pytest.raises(ValueError, match="NaN"):
        average_precision(np.array([np.nan, 0.5, 0.1]), targets[:, 0] > 0)
    # Equal infinities are one threshold, like any tie (a frame without a prediction scores -inf); scikit-learn does
    # not take infinities, so it scores the same order with finite stand-ins.
    for scores in ([np.inf, np.inf, 0.5], [0.9, -np.inf, -np.inf], [np.inf, np.inf, -np.inf]):
        finite = np.nan_to_num(np.array(scores), posinf=1e9, neginf=-1e9)
        expected = sklearn_map(finite[:, None], targets)
        assert mean_average_precision(np.array(scores)[:, None], targets) == pytest.approx(expected, abs=1e-12)
    assert mean_average_precision(np.array([[np.inf], [np.inf], [0.5]]), targets) == pytest.approx(
        100 * (0.5 * 0.5 + 0.5 * 2 / 3))


def test_localization_frame_indices():
    assert localization_frame_indices(100) == list(range(0, 100, 4))
    assert localization_frame_indices(10) == [j * 10 // 25 for j in range(25)]
    assert localization_frame_indices(1) == [0] * 25
    # Official time points j·length/25 of a 30 s video at 24 fps are frames j·720/25.
    assert localization_frame_indices(720) == [math.floor(j * 30 / 25 * 24) for j in range(25)]


def test_localization_map_uses_25_frames_per_video():
    rng = np.random.default_rng(1)
    logits = [torch.from_numpy(rng.normal(size=(6, t))) for t in (30, 50, 25)]
    targets = [torch.from_numpy((rng.random((6, t)) < 0.3).astype(np.float64)) for t in (30, 50, 25)]
    scores = np.concatenate([lg.numpy()[:, localization_frame_indices(lg.shape[1])].T for lg in logits])
    truth = np.concatenate([tg.numpy()[:, localization_frame_indices(tg.shape[1])].T for tg in targets])
    assert scores.shape == (75, 6)
    assert localization_map(logits, targets) == pytest.approx(sklearn_map(scores, truth), abs=1e-9)
    batch_logits, batch_targets = torch.stack([lg[:, :25] for lg in logits]), torch.stack([t[:, :25] for t in targets])
    expected = sklearn_map(batch_logits.permute(0, 2, 1).reshape(-1, 6).numpy(),
                           batch_targets.permute(0, 2, 1).reshape(-1, 6).numpy())
    assert localization_map(batch_logits, batch_targets) == pytest.approx(expected, abs=1e-9)  # (N, K, T) input


def test_chance_map_is_the_map_of_constant_scores():
    rng = np.random.default_rng(0)
    targets = (rng.random((50, 7)) < [0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.0]).astype(np.float32)
    targets[0, 0] = 1  # every class but the last has a positive
    want = mean_average_precision(np.zeros(targets.shape), targets)  # all tied: AP = positive rate
    assert chance_map(targets) == pytest.approx(want)
    assert chance_map(targets) == pytest.approx(100 * targets[:, :6].mean(0).mean())
    with pytest.raises(ValueError, match="no class has a positive"):
        chance_map(np.zeros((3, 2)))


def test_test_videos_missing_on_disk_are_scored_as_failed_not_left_out(root: Path):
    write_csv(root / "Charades_v1_test.csv", {"CCCCC": ACTIONS["CCCCC"], "YYYYY": ACTIONS["AAAAA"]})
    test = dataset(root, "test", mode="test", num_temporal_views=1, num_spatial_crops=1, max_failure_fraction=0.5)
    assert [v.id for v in test.videos] == ["CCCCC", "YYYYY"] and test.missing == ["YYYYY"]
    assert test.failure_count == 1 and test[1][3] == -1 and test[0][3] == 0  # YYYYY: no view; CCCCC decodes
    with pytest.raises(TooManyFailuresError, match="1 of 2 videos failed to decode"):  # at once, not after training
        dataset(root, "test", mode="test", num_temporal_views=1, num_spatial_crops=1, max_failure_fraction=0.4)
    assert dataset(root, "train").num_videos == 2  # training leaves missing videos out
