"""The two Charades recipes end to end on generated data: fine-tuning from every external checkpoint format, the
localization metric and the stitching of sliding clips by hand, evaluation with 1 and 2 processes, resuming a killed
run."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from test_checkpoints import TO_PYSLOWFAST, original_repo_state, our_model, rename
from torch import nn

import train_x3d_charades as classify
import train_x3d_charades_loc as localize
from charades import CharadesVideo, localization_frame_indices, localization_map, localization_targets
from tools import make_demo_data
from utils import load_checkpoint_file

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"charades": classify, "charades_loc": localize}
# A tiny X3D-XS input so that a run takes seconds on a CPU; 4 frames every 6th of the 24-fps frames span 1 s.
TINY = ["--model", "x3d_xs", "--frames", "4", "--sampling-rate", "6", "--crop", "32", "--jitter", "36", "44",
        "--test-crop", "36", "--batch-size", "1", "--epochs", "2", "--workers", "0", "--no-progress"]
VIEWS = {"charades": ["--val-views", "2", "--test-views", "2"], "charades_loc": []}
PLATEAU = ["--epochs", "3", "--patience", "0", "--lr", "0.05"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    make_demo_data.main(make_demo_data.get_args_parser().parse_args(
        ["--out", str(out), "--datasets", "charades", "--charades-classes", "4", "--charades-videos", "8",
         "--charades-test-videos", "4", "--charades-seconds", "2", "3", "--size", "48", "--workers", "1"]))
    return out / "charades"


def flags(recipe: str, data: Path, run: Path, *extra: str) -> list[str]:
    return ["--data-root", str(data), "--output-dir", str(run), *TINY, *VIEWS[recipe], *extra]


def run_script(recipe: str, args: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / f"train_x3d_{recipe}.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, **kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Fine-tuning from the external formats: all but the 400-class classifier is loaded, and the run says so
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def external(tmp_path_factory) -> dict[str, Path]:
    """Kinetics-400 X3D-XS weights in PySlowFast's, PyTorchVideo's and the original repository's files."""
    out = tmp_path_factory.mktemp("weights")
    model = our_model("x3d_xs", num_classes=400)
    files = {"pyslowfast": out / "x3d_xs.pyth", "x3d_multigrid": out / "x3d_multigrid_kinetics_fb_pretrained.pt",
             "pytorchvideo": out / "X3D_XS.pyth"}
    torch.save({"model_state": {rename(k, TO_PYSLOWFAST): v for k, v in model.state_dict().items()}, "epoch": 299},
               files["pyslowfast"])
    torch.save({"model_state_dict": original_repo_state(model, k=1)[0]}, files["x3d_multigrid"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pytorchvideo.models.x3d import create_x3d
    reference = create_x3d(input_clip_length=4, input_crop_size=160, model_num_class=400, head_activation=None)
    torch.save({"model_state": reference.state_dict()}, files["pytorchvideo"])
    return files


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("fmt", ["pyslowfast", "pytorchvideo", "x3d_multigrid"])
def test_finetuning_from_each_external_format(recipe, fmt, data, external, tmp_path, capsys):
    args = RECIPES[recipe].get_args_parser().parse_args(
        flags(recipe, data, tmp_path / "run", "--epochs", "1", "--finetune", str(external[fmt])))
    stats = RECIPES[recipe].main(args)
    out = capsys.readouterr().out
    ckpt = load_checkpoint_file(tmp_path / "run" / "checkpoint.pt")
    tensors = len(ckpt["model"])
    assert (f"fine-tuning: loaded {tensors - 2} tensors, missing 0 (kept their initialisation), unexpected 0 "
            "(ignored), shape mismatch 2 (kept their initialisation)") in out
    assert ("  shape mismatch: head.classifier.weight [400, 2048] in the checkpoint, [4, 2048] in the model, "
            "head.classifier.bias [400] in the checkpoint, [4] in the model") in out
    assert "train set: 8 videos, 4 classes, none missing on disk" in out and "val set: 4 videos, 4 classes" in out
    assert stats["train_iters"] == 8 and math.isfinite(stats["train_loss"]) and "train_top1" not in stats
    assert 0 <= stats["test_map"] <= 100 and stats["test_videos"] == 4
    assert ckpt["model_cfg"]["head"] == ("frame" if recipe == "charades_loc" else "clip")
    assert ckpt["model_cfg"]["sampling_rate"] == 6 and ckpt["classes"][0] == "red object moving right"


# ----------------------------------------------------------------------------------------------------------------------
# The localization protocol and the stitching of sliding clips, by hand
# ----------------------------------------------------------------------------------------------------------------------
def test_localization_map_by_hand():
    # Video A, 10 s: class 0 from 0 to 3.9 s. The protocol's 25 time points j·10/25 = 0, 0.4, ... 9.6 s put it on
    # points 0..9. Video B, 5 s: class 1 from 2 s to the end, points 10..24 (j·0.2 s).
    videos = [CharadesVideo("A", "test", 10.0, [(0, 0.0, 3.9)]), CharadesVideo("B", "test", 5.0, [(1, 2.0, 5.0)])]
    targets = torch.stack([localization_targets(v, 2) for v in videos])  # (2 videos, 2 classes, 25 points)
    assert targets[0, 0].tolist() == [1.0] * 10 + [0.0] * 15 and targets[1, 1].tolist() == [0.0] * 10 + [1.0] * 15
    assert targets[0, 1].sum() == 0 and targets[1, 0].sum() == 0
    # A's sequence has 50 frames: point j is frame 2j, and the odd frames must not count. B has 25 frames.
    a, b = torch.full((2, 50), 100.0), torch.empty(2, 25)
    j = torch.arange(25)
    # Class 0 ranks A's points 0..4 first, then A's negatives 10..24, then A's points 5..9, then all of B.
    a[0, 2 * j] = torch.where(j < 5, 30 - j, torch.where(j < 10, -j, 20 - j)).float()
    b[0] = -50.0
    # Class 1: B's positive points share one top score (tied positives), B's negatives next, A has no prediction.
    a[1, 2 * j] = -math.inf
    b[1] = torch.where(j >= 10, 5.0, 4.0)
    ap0 = (5 + 6 / 21 + 7 / 22 + 8 / 23 + 9 / 24 + 10 / 25) / 10  # positives at ranks 1-5 and 21-25 of 50
    ap1 = 1.0
    scores = torch.stack([x[:, localization_frame_indices(x.shape[1])] for x in (a, b)])  # as the recipe picks them
    assert localization_map(scores, targets) == pytest.approx(100 * (ap0 + ap1) / 2, abs=1e-9)


class FrameReporter(nn.Module):
    """A stand-in model: per-frame logits (N, 1, T) = the frame's value + its position within the clip."""

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return (clips[:, :1, :, 0, 0] + torch.arange(clips.shape[2]))  # (N, C, T, H, W) -> (N, 1, T)


@pytest.mark.parametrize(("length", "offsets"), [
    (10, [0, 1, 1, 2, 1, 2, 1, 2, 2, 3]),  # clips start at 0, 2, 4, 6: frame t is at t - start in each that holds it
    (11, [0, 1, 1, 2, 1, 2, 1, 4 / 3, 1.5, 2.5, 3]),  # and one more at 7, so that the last clip ends with the video
    (3, [0, 1, 2]),  # shorter than a clip: one clip of the whole video
])
def test_sliding_clips_are_averaged_where_they_overlap(length, offsets):
    video = torch.arange(length, dtype=torch.float32).view(1, length, 1, 1).expand(3, length, 2, 2) * 10
    logits = localize.video_logits(FrameReporter(), video, window=4, batch_size=3, device=torch.device("cpu"),
                                   amp="none")
    assert logits.shape == (1, length)
    assert logits[0].tolist() == pytest.approx([10 * t + o for t, o in enumerate(offsets)])


# ----------------------------------------------------------------------------------------------------------------------
# Runs: evaluation with 1 and 2 processes, resuming a killed run to identical weights and whole-epoch statistics
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> dict[str, Path]:
    """One uninterrupted run of each recipe, 3 epochs with the plateau policy at patience 0: the LR falls after every
    evaluation that brings no lower loss (at this LR the second one), so a resumed run must know the past ones."""
    runs = {}
    for recipe in RECIPES:
        runs[recipe] = tmp_path_factory.mktemp("run") / recipe
        result = run_script(recipe, flags(recipe, data, runs[recipe], *PLATEAU))
        assert result.returncode == 0, result.stderr
    return runs


@pytest.mark.parametrize("recipe", RECIPES)
def test_evaluation_with_two_processes_equals_one(recipe, trained, data):
    lines = []
    for extra in ([], ["--nproc", "2"]):
        result = run_script(recipe, ["--data-root", str(data), "--eval", "--resume", str(trained[recipe] /
                                     "checkpoint.pt"), "--workers", "0", "--batch-size", "1", "--test-crops", "3",
                                     "--no-progress",
                                     *(["--test-views", "3"] if recipe == "charades" else []), *extra])
        assert result.returncode == 0, result.stderr
        lines.append([line for line in result.stdout.splitlines() if line.startswith("test: ")])
    expected = "(4 videos × 9 views)" if recipe == "charades" else "(4 videos, 25 frames each, 3 crops)"
    assert lines[0] and lines[0] == lines[1] and expected in lines[0][0]


def test_two_process_training_evaluates_and_saves_one_model(tmp_path):
    """Without precise BN each rank's BN statistics follow its own batches (8 clips per device: plain BN, not
    synchronised); the ranks pool them before evaluating and saving, so the run's own test scores every video with
    the model its checkpoint holds."""
    make_demo_data.main(make_demo_data.get_args_parser().parse_args(
        ["--out", str(tmp_path), "--datasets", "charades", "--charades-classes", "4", "--charades-videos", "16",
         "--charades-test-videos", "4", "--charades-seconds", "2", "3", "--size", "48", "--workers", "1"]))
    data, run = tmp_path / "charades", tmp_path / "ddp"
    result = run_script("charades", flags("charades", data, run, "--epochs", "1", "--batch-size", "8",
                                          "--precise-bn-batches", "0", "--nproc", "2"))
    assert result.returncode == 0, result.stderr
    in_run = [line for line in result.stdout.splitlines() if line.startswith("test: ")]
    result = run_script("charades", ["--data-root", str(data), "--eval", "--resume", str(run / "checkpoint.pt"),
                                     "--workers", "0", "--no-progress", *VIEWS["charades"]])
    assert result.returncode == 0, result.stderr
    assert in_run and in_run == [line for line in result.stdout.splitlines() if line.startswith("test: ")]


def test_a_run_killed_while_evaluating_evaluates_again_and_ends_the_same(trained, data, tmp_path):
    run = tmp_path / "killed_in_eval"
    args = flags("charades", data, run, *PLATEAU)
    killer = textwrap.dedent(f"""
        import os, signal, sys
        import train_x3d_charades as recipe
        evaluate, calls = recipe.evaluate, []
        def killed_in_the_second(*args, **kwargs):  # the second epoch's validation: the plateau policy then acts
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return evaluate(*args, **kwargs)
        recipe.evaluate = killed_in_the_second
        recipe.utils.launch(recipe.get_args_parser().parse_args({args!r}), recipe.main)
    """)
    proc = subprocess.run([sys.executable, "-c", killer], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    killed_at = load_checkpoint_file(run / "checkpoint.pt")
    assert killed_at["epoch"] == 2 and killed_at["iteration"] == 0 and len(killed_at["evaluations"]) == 1
    assert killed_at["pending_evaluation"]["train_iters"] == 8

    result = run_script("charades", args)
    assert result.returncode == 0, result.stderr
    resumed, uninterrupted = (load_checkpoint_file(p / "checkpoint.pt") for p in (run, trained["charades"]))
    for key in uninterrupted["model"]:
        assert torch.equal(resumed["model"][key], uninterrupted["model"][key]), key
    assert resumed["evaluations"] == uninterrupted["evaluations"] and resumed["pending_evaluation"] is None
    def lines(folder: Path) -> list[dict]:  # every epoch logged once, with the same numbers but for the timings
        timed = ("seconds", "clips_per_s", "data_wait", "shapes")
        return [{k: v for k, v in json.loads(line).items() if not k.endswith(timed)}
                for line in (folder / "log.jsonl").read_text().splitlines()]

    assert lines(run) == lines(trained["charades"])


def test_killed_run_resumes_to_identical_weights_and_whole_epoch_statistics(trained, data, tmp_path, signal_mid_epoch):
    run = tmp_path / "killed"
    args = flags("charades", data, run, *PLATEAU, "--save-every", "1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_x3d_charades.py"), *args], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    killed = signal_mid_epoch(proc, run, lambda ckpt: ckpt["epoch"] >= 1, signal.SIGKILL)  # after the first epoch
    proc.wait()
    assert killed is not None and proc.returncode == -signal.SIGKILL, "the run finished before it was killed mid-epoch"
    killed_at = load_checkpoint_file(run / "checkpoint.pt")
    assert killed_at["iteration"] > 0 and killed_at["epoch_meters"]["iters"] == killed_at["iteration"]
    assert len(killed_at["evaluations"]) == killed_at["epoch"]  # the plateau policy's memory

    result = run_script("charades", args)
    assert result.returncode == 0, result.stderr
    assert f"epoch {killed_at['epoch'] + 1}/3, iteration {killed_at['iteration']}" in result.stdout
    resumed, uninterrupted = (load_checkpoint_file(p / "checkpoint.pt") for p in (run, trained["charades"]))
    for key in uninterrupted["model"]:
        assert torch.equal(resumed["model"][key], uninterrupted["model"][key]), key
    assert resumed["evaluations"] == uninterrupted["evaluations"]
    # The killed epoch is logged once, with the loss and iterations of all of it, not only of its resumed part.
    def epoch_lines(folder: Path) -> list[dict]:
        log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
        return [r for r in log if r["epoch"] == killed_at["epoch"] + 1 and "train_loss" in r]

    ours, theirs = epoch_lines(run), epoch_lines(trained["charades"])
    lrs = [r["train_lr"] for r in map(json.loads, (trained["charades"] / "log.jsonl").read_text().splitlines())
           if "train_lr" in r]
    assert lrs == pytest.approx([0.05, 0.05, 0.005])  # the plateau policy acted, so the resumed run had to know it
    assert len(ours) == 1 and ours[0]["train_iters"] == theirs[0]["train_iters"] == 8
    assert ours[0]["train_loss"] == theirs[0]["train_loss"] and ours[0]["train_lr"] == theirs[0]["train_lr"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_predict_scores_a_charades_checkpoint_as_the_recipe_does(recipe, trained, data, capsys):
    import predict

    ckpt = load_checkpoint_file(trained[recipe] / "checkpoint.pt")
    assert ckpt["multi_label"] and ckpt["rate_fps"] == 24.0 and ckpt["mean"] == [0.413, 0.368, 0.338]
    video = sorted((data / "Charades_v1_rgb").iterdir())[0]
    result = predict.main(predict.get_args_parser().parse_args(
        [str(video), "--checkpoint", str(trained[recipe] / "checkpoint.pt"), "--views", "2", "--crops", "1"]))
    assert "2 views, sigmoid of the highest logit, multi-label" in capsys.readouterr().out
    assert len(result) == 4 and all(0 < p < 1 for _, p in result)
    assert {name for name, _ in result} == set(ckpt["classes"])
