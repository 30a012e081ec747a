"""The Kinetics recipe end to end on generated videos: train, resume after SIGKILL, damaged checkpoints, evaluation
with 1 and 2 processes, plots, predict.py."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import predict
import train_x3d_kinetics_multigrid as recipe
from tools import make_demo_data, plot_run
from utils import CheckpointError, load_checkpoint_file

ROOT = Path(__file__).resolve().parents[1]
# A tiny X3D-XS input so that a whole multigrid schedule runs in seconds on a CPU.
TINY = ["--model", "x3d_xs", "--frames", "4", "--sampling-rate", "2", "--crop", "32", "--jitter", "36", "44",
        "--test-crop", "36", "--batch-size", "1", "--epochs", "2", "--warmup-epochs", "0.5", "--lr", "0.05",
        "--workers", "0", "--precise-bn-batches", "2", "--eval-every", "1", "--test-views", "2", "--no-progress"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    make_demo_data.main(make_demo_data.get_args_parser().parse_args(
        ["--out", str(out), "--datasets", "kinetics", "--classes", "2", "--train-per-class", "8",
         "--val-per-class", "2", "--seconds", "2", "--size", "48", "--workers", "1"]))
    return out / "kinetics"


def flags(data: Path, run: Path, *extra: str) -> list[str]:
    return ["--data-root", str(data), "--output-dir", str(run), *TINY, *extra]


def run_script(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "train_x3d_kinetics_multigrid.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, **kwargs)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    """One uninterrupted multigrid run (long + short cycle, cosine LR)."""
    run = tmp_path_factory.mktemp("run") / "a"
    result = run_script(flags(data, run))  # a subprocess like the resumed run below: same threads, same floats
    assert result.returncode == 0, result.stderr
    return run


def test_training_writes_run_folder(trained, data):
    log = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in log if "train_loss" in r]
    schedule = json.loads((trained / "schedule.json").read_text())
    assert len(epochs) == schedule["stages"][-1]["end"] > 2  # the multigrid schedule stretched the 2 epochs
    assert {r["shape"] for r in epochs} >= {"1x23", "2x23", "2x32", "4x32"}  # every long-cycle shape was trained
    assert all(0 <= r["train_data_wait"] <= 1 and r["val_videos"] == 4 for r in epochs)
    assert "test_top1" in log[-1] and log[-1]["test_views"] == 6 and log[-1]["test_videos"] == 4
    per_class = log[-1]["test_class_top1"]
    labels = (data / "labels.txt").read_text().split("\n")
    assert list(per_class) == [label for label in labels if label] and len(per_class) == 2
    assert log[-1]["test_mean_class_top1"] == pytest.approx(sum(per_class.values()) / len(per_class))
    ckpt = load_checkpoint_file(trained / "checkpoint.pt")
    assert ckpt["epoch"] == len(epochs) and ckpt["iteration"] == 0 and ckpt["model_cfg"]["frames"] == 4
    assert json.loads((trained / "args.json").read_text())["model"] == "x3d_xs"
    written = plot_run.main(plot_run.get_args_parser().parse_args([str(trained)]))
    assert [p.name for p in written] == ["curves.png", "schedule.png"] and all(p.stat().st_size > 1000 for p in written)


def test_rerunning_a_finished_run_resumes_instead_of_retraining(trained, data, capsys):
    before = (trained / "log.jsonl").read_text()
    stats = recipe.main(recipe.get_args_parser().parse_args(flags(data, trained, "--test-views", "0")))
    assert "Resumed from" in capsys.readouterr().out and stats == {}
    assert (trained / "log.jsonl").read_text() == before


def test_sigkill_mid_epoch_then_rerun_ends_with_identical_weights(trained, data, tmp_path):
    run = tmp_path / "b"
    args = flags(data, run, "--save-every", "1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_x3d_kinetics_multigrid.py"), *args], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # wait for a mid-epoch checkpoint after the first epoch
        try:
            ckpt = load_checkpoint_file(run / "checkpoint.pt")
            if ckpt["epoch"] >= 1 and ckpt["iteration"] == 2:  # early in an epoch, so the kill lands mid-epoch
                break
        except CheckpointError:
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed mid-epoch"
    killed_at = load_checkpoint_file(run / "checkpoint.pt")
    assert killed_at["iteration"] > 0

    result = run_script(args)
    assert result.returncode == 0, result.stderr
    assert f"epoch {killed_at['epoch']}, iteration {killed_at['iteration']}" in result.stdout
    resumed, uninterrupted = (load_checkpoint_file(p / "checkpoint.pt")["model"] for p in (run, trained))
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        assert torch.equal(resumed[key], uninterrupted[key]), key


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(trained, data, tmp_path):
    run = tmp_path / "c"
    run.mkdir()
    for name in ("checkpoint.pt", "args.json", "schedule.json", "log.jsonl"):
        (run / name).write_bytes((trained / name).read_bytes())
    (run / "checkpoint_prev.pt").write_bytes((trained / "checkpoint.pt").read_bytes())
    (run / "checkpoint.pt").write_bytes(b"\x00" * 100)  # e.g. a disk that filled up
    result = run_script(flags(data, run, "--test-views", "0"))
    assert result.returncode == 0, result.stderr
    assert f"{run / 'checkpoint.pt'}: not a readable checkpoint" in result.stderr
    assert "resuming from the previous checkpoint" in result.stderr and "Resumed from" in result.stdout
    assert (run / "checkpoint_damaged.pt").read_bytes() == b"\x00" * 100

    (run / "checkpoint_prev.pt").write_bytes(b"garbage")
    result = run_script(flags(data, run))
    assert result.returncode != 0 and f"{run / 'checkpoint_prev.pt'}: not a readable checkpoint" in result.stderr


def test_eval_with_two_processes_equals_one(trained, data):
    lines = []
    for extra in ([], ["--nproc", "2"]):
        result = run_script(["--data-root", str(data), "--eval", "--resume", str(trained / "checkpoint.pt"),
                             "--workers", "0", "--test-views", "3", "--test-crops", "3", "--no-progress", *extra])
        assert result.returncode == 0, result.stderr
        lines.append([line for line in result.stdout.splitlines() if line.startswith("test: video top-1")])
    assert lines[0] and lines[0] == lines[1] and "(4 videos × 9 views)" in lines[0][0]


def test_two_process_training_runs(data, tmp_path):
    result = run_script(flags(data, tmp_path / "ddp", "--nproc", "2", "--multigrid", "none", "--epochs", "1"))
    assert result.returncode == 0, result.stderr
    log = [json.loads(line) for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert log[0]["train_iters"] == 8 and log[-1]["test_videos"] == 4  # 16 clips over 2 ranks at batch 1


def test_predict_prints_top_classes(trained, data, capsys):
    video = next((data / "val").rglob("*.mp4"))
    result = predict.main(predict.get_args_parser().parse_args(
        [str(video), "--checkpoint", str(trained / "checkpoint.pt"), "--labels", str(data / "labels.txt")]))
    out = capsys.readouterr().out
    assert "30 views" in out and len(result) == 2
    assert {name for name, _ in result} == set((data / "labels.txt").read_text().splitlines())
    assert sum(p for _, p in result) == pytest.approx(1.0, abs=1e-4)
