"""The Kinetics recipe end to end on generated videos: train, resume after SIGKILL and Ctrl-C, damaged checkpoints,
evaluation with 1 and 2 processes, refused settings and their messages, plots, predict.py."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import depthwise_conv
import engine
import native
import predict
import train_x3d_kinetics_multigrid as recipe
import utils
from kinetics_multigrid import build_kinetics
from tools import make_demo_data, plot_run
from utils import CheckpointError, UserError, load_checkpoint_file
from x3d import build_model_from_cfg

ROOT = Path(__file__).resolve().parents[1]
# A tiny X3D-XS input so that a whole multigrid schedule runs in seconds on a CPU.
TINY = ["--model", "x3d_xs", "--frames", "4", "--sampling-rate", "2", "--crop", "32", "--jitter", "36", "44",
        "--test-crop", "36", "--batch-size", "1", "--epochs", "2", "--warmup-epochs", "0.5", "--lr", "0.05",
        "--workers", "0", "--precise-bn-batches", "2", "--eval-every", "1", "--test-views", "2", "--no-progress",
        "--min-frames", "1"]  # the paper's rule: every one of the four long-cycle shapes differs


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    make_demo_data.main(make_demo_data.get_args_parser().parse_args(
        ["--out", str(out), "--datasets", "kinetics", "--classes", "2", "--train-per-class", "8",
         "--val-per-class", "2", "--seconds", "2", "--size", "48", "--workers", "1"]))
    return out / "kinetics"


def flags(data: Path, run: Path, *extra: str) -> list[str]:
    return ["--data-root", str(data), "--output-dir", str(run), *TINY, *extra]


def parse(*argv: str):
    return recipe.get_args_parser().parse_args(list(argv))


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


def test_rerunning_a_finished_run_says_so_and_keeps_its_log(trained, data, capsys):
    before = (trained / "log.jsonl").read_text()
    stats = recipe.main(parse(*flags(data, trained)))
    out = capsys.readouterr().out
    stored = json.loads(before.splitlines()[-1])
    assert f"{trained}: this run is finished (5 epochs); its test: video top-1 {stored['test_top1']:.2f}" in out
    assert "--eval" in out and stats == stored
    assert (trained / "log.jsonl").read_text() == before  # no second test line


def test_rerunning_with_other_flags_is_refused(trained, data):
    before = (trained / "args.json").read_text()
    with pytest.raises(UserError, match=r"checkpoint\.pt was trained with other settings: --model x3d_s \(the run has "
                                        r"x3d_xs\); --epochs 3 \(the run has 2\); --warmup-epochs 1\.0 \(the run has "
                                        r"0\.5\)\..*--restart.*--output-dir"):
        recipe.main(parse(*flags(data, trained, "--model", "x3d_s", "--epochs", "3", "--warmup-epochs", "1")))
    utils.check_same_run(parse(*flags(data, trained, "--workers", "3", "--eval-every", "7")),
                         load_checkpoint_file(trained / "checkpoint.pt")["args"], trained)  # not run-shaping
    assert (trained / "args.json").read_text() == before


def test_a_batch_larger_than_the_data_is_refused_at_start(data, tmp_path):
    # 16 training videos: multigrid's first batch at --batch-size 8 is 8 × 8 × 2 clips, and would never be complete.
    with pytest.raises(UserError, match=r"16 training videos are 16 per process \(1 process\), fewer than the largest "
                                        r"batch of the schedule, 128 clips.*use --batch-size 1 or less"):
        recipe.main(parse(*flags(data, tmp_path / "run", "--batch-size", "8")))
    assert not (tmp_path / "run" / "args.json").exists()
    args = parse(*flags(data, tmp_path / "run"))
    schedule = engine.build_schedule(args, engine.resolve_input(args, None), 1, default_lr=0.1)
    assert engine.check_iterations(schedule, 16, 1, 1)[0].startswith(
        "warning: only 1 training step per epoch at shape 1x23 (fewer than 10)")
    assert engine.check_iterations(schedule, 200, 1, 1) == []
    with pytest.raises(UserError, match=r"16 training videos are 8 per process \(2 processes\).*To fix it, use "
                                        r"--multigrid none, more training videos or fewer processes"):
        engine.check_iterations(schedule, 16, 2, 1)


def test_flag_combinations_are_checked_before_any_data(tmp_path):
    empty = tmp_path / "empty"  # exists but holds no annotations: the flags must be the first thing reported
    empty.mkdir()
    for extra, message in [
        (["--epochs", "30"], r"--warmup-epochs 35 must be in \[0, --epochs 30\)"),
        (["--lr-policy", "steps", "--warmup-epochs", "0"], "--lr-policy steps needs --steps"),
        (["--lr-policy", "steps", "--steps", "0", "--warmup-epochs", "0"], "needs a --steps epoch after 0"),
        (["--steps", "100", "50"], r"--steps \[100, 50\] must increase"),
        (["--crop", "200"], r"--jitter \[182, 228\] must be MIN <= MAX with MIN at least --crop 200"),
        (["--max-failure-fraction", "2"], "--max-failure-fraction must be in"),
        (["--restart", "--eval"], "--restart starts the run folder over"),
        (["--eval", "--test-views", "0"], "--eval runs the test: --test-views must be at least 1"),
        (["-gpu", "a,b"], "-gpu takes comma-separated device numbers"),
    ]:
        with pytest.raises(UserError, match=message):
            recipe.main(parse("--data-root", str(empty), "--model", "x3d_xs", "--output-dir", str(tmp_path / "r"),
                              "--epochs", "300", *extra))
    with pytest.raises(UserError, match="--data-root .*missing does not exist"):
        recipe.check_args(parse("--data-root", str(tmp_path / "missing")))


def test_user_errors_exit_2_with_a_message_not_a_traceback(tmp_path):
    result = run_script(["--data-root", str(tmp_path / "kinetics400"), "--model", "x3d_xs"])
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"error: --data-root {tmp_path / 'kinetics400'} does not exist or is not a folder\n"
    result = run_script(["--data-root", str(tmp_path), "--model", "x3d-xs"])  # a typo: argparse names the choices
    assert result.returncode == 2 and "invalid choice: 'x3d-xs'" in result.stderr and "x3d_xs" in result.stderr


def test_finetune_prints_counts_and_refuses_another_variant(trained, data, tmp_path, capsys):
    weights = str(trained / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"another X3D than x3d_l.*They fit x3d_xs, x3d_s, x3d_m"):
        recipe.main(parse(*flags(data, tmp_path / "l", "--model", "x3d_l", "--finetune", weights)))
    stats = recipe.main(parse(*flags(data, tmp_path / "xs", "--finetune", weights, "--multigrid", "none", "--epochs",
                                     "1", "--test-views", "0", "--precise-bn-batches", "0")))
    out = capsys.readouterr().out
    tensors = len(load_checkpoint_file(trained / "checkpoint.pt")["model"])
    assert (f"fine-tuning: loaded {tensors} tensors, missing 0 (kept their initialisation), unexpected 0 (ignored), "
            "shape mismatch 0" in out) and stats["train_iters"] == 16
    recipe.main(parse(*flags(data, tmp_path / "s", "--model", "x3d_s", "--finetune", weights, "--multigrid", "none",
                             "--epochs", "1", "--test-views", "0", "--precise-bn-batches", "0")))
    assert f"warning: {weights} holds x3d_xs weights; they are fine-tuned as x3d_s" in capsys.readouterr().err


def test_sigkill_mid_epoch_then_rerun_ends_with_identical_weights(trained, data, tmp_path, signal_mid_epoch):
    run = tmp_path / "b"
    args = flags(data, run, "--save-every", "1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_x3d_kinetics_multigrid.py"), *args], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    # In the longest epoch after the first: multigrid's epochs differ in length.
    epochs = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    lengths = {e["epoch"] - 1: e["train_iters"] for e in epochs if "train_iters" in e}  # checkpoints count from 0
    target = max((e for e in lengths if e >= 1), key=lengths.get)
    killed = signal_mid_epoch(proc, run, lambda ckpt: ckpt["epoch"] == target, signal.SIGKILL)
    proc.wait()
    assert killed is not None and proc.returncode == -signal.SIGKILL, "the run finished before it was killed mid-epoch"
    killed_at = load_checkpoint_file(run / "checkpoint.pt")
    assert killed_at["iteration"] > 0

    result = run_script(args)
    assert result.returncode == 0, result.stderr
    assert f"epoch {killed_at['epoch'] + 1}/5, iteration {killed_at['iteration']}" in result.stdout  # 1-based
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
    assert "resuming from the previous checkpoint" in result.stderr and "this run is finished" in result.stdout
    assert (run / "checkpoint_damaged.pt").read_bytes() == b"\x00" * 100

    (run / "checkpoint_prev.pt").write_bytes(b"garbage")
    result = run_script(flags(data, run))
    assert result.returncode != 0 and f"{run / 'checkpoint_prev.pt'}: not a readable checkpoint" in result.stderr


def test_ctrl_c_saves_at_once_and_the_printed_command_resumes(trained, data, tmp_path, signal_mid_epoch):
    run = tmp_path / "d"
    shutil.copytree(trained, run)  # --restart moves the finished run aside and trains it again from scratch
    args = flags(data, run, "--save-every", "2", "--restart")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_x3d_kinetics_multigrid.py"), *args], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert signal_mid_epoch(proc, run, lambda ckpt: ckpt["epoch"] >= 3, signal.SIGINT)  # into the 6-step epochs
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert out.startswith("device: cpu") and "--restart: the previous run's files are moved to" in out
    header = next(line.split() for line in out.splitlines() if line.lstrip().startswith("stage"))
    assert header[8] == "iters"  # the printed schedule shows the iterations per epoch of every stage
    saved = load_checkpoint_file(run / "checkpoint.pt")
    assert f"Ctrl-C: stopped at epoch {saved['epoch'] + 1}/5, iteration {saved['iteration']} and saved" in err
    assert "Traceback" not in err and (run / "previous_1" / "checkpoint.pt").exists()
    command = shlex.split(err.split("Resume with the same command:\n")[1].splitlines()[0])
    assert command[0] == "python" and Path(command[1]) == ROOT / "train_x3d_kinetics_multigrid.py"
    assert command[2:] == [a for a in args if a != "--restart"]

    result = run_script(command[2:])
    assert result.returncode == 0, result.stderr
    assert f"epoch {saved['epoch'] + 1}/5, iteration {saved['iteration']}" in result.stdout
    resumed, uninterrupted = (load_checkpoint_file(p / "checkpoint.pt")["model"] for p in (run, trained))
    for key in resumed:
        assert torch.equal(resumed[key], uninterrupted[key]), key


def test_failure_limit_counts_the_videos_of_all_processes(trained, data, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    val = build_kinetics(copy, "val", mode="test", num_temporal_views=1, num_spatial_crops=1)
    for path in val.paths[::2]:  # one video per process (each scores a block of 2 videos), 2 of 4 in all
        Path(path).write_bytes(b"not a video")
    args = ["--data-root", str(copy), "--eval", "--resume", str(trained / "checkpoint.pt"), "--workers", "0",
            "--test-views", "1", "--test-crops", "1", "--max-failure-fraction", "0.3", "--no-progress", "--nproc", "2"]
    result = run_script(args)  # each process alone has 1 of 4 failed (< 30 %), together 2 of 4 (> 30 %)
    assert result.returncode == 2, result.stderr
    assert "error: 2 of 4 videos failed to decode, more than the allowed 30.0%" in result.stderr
    assert "test: video top-1" not in result.stdout


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


def test_predict_refuses_a_variant_that_does_not_fit(trained, data, capsys):
    video = str(next((data / "val").rglob("*.mp4")))
    with pytest.raises(SystemExit):  # a typo is caught by the choices
        predict.get_args_parser().parse_args([video, "--checkpoint", "x.pt", "--model", "x3d-xs"])
    args = predict.get_args_parser().parse_args([video, "--checkpoint", str(trained / "checkpoint.pt"), "--model",
                                                 "x3d_l"])
    assert utils.run_cli(predict.main, args) == 2
    assert "--model x3d_l does not fit these weights" in capsys.readouterr().err


def test_timed_depthwise_backward_choices_are_saved_and_a_resume_takes_them(data, tmp_path, monkeypatch):
    monkeypatch.setenv("X3D_DEPTHWISE_BACKWARD", "auto")
    monkeypatch.setattr(depthwise_conv, "_choices", {})
    run = tmp_path / "auto"
    args = flags(data, run, "--multigrid", "none", "--epochs", "1", "--test-views", "0", "--precise-bn-batches", "0")
    recipe.main(parse(*args))
    table = load_checkpoint_file(run / "checkpoint.pt")["depthwise_backward"]
    assert table and set(table.values()) <= set(depthwise_conv.BACKWARDS)
    assert all(key.startswith("c") and " in" in key for key in table)  # one entry per layer and input shape

    flipped = {key: "aten" if v != "aten" else "own" for key, v in table.items()}
    ckpt = load_checkpoint_file(run / "checkpoint.pt")
    ckpt["depthwise_backward"] = flipped
    monkeypatch.setattr(depthwise_conv, "_choices", {})
    model = build_model_from_cfg(ckpt["model_cfg"])
    engine.restore(ckpt, model, engine.build_optimizer(model, lr=0.0, weight_decay=0.0), None)  # what a resume does
    assert depthwise_conv.choices() == flipped


def test_compiled_training_follows_multigrid_shapes_like_eager(data, tmp_path, monkeypatch):
    """--compile: one graph per batch shape of the schedule, none compiled twice, and the run trains as eager does.
    (aot_eager traces exactly what inductor compiles, without the minutes of code generation; no dropout, whose random
    stream differs when compiled, and ATen's depthwise backward and batch norm, which the compiled graph takes; a small
    LR, at which the steps do not amplify the rounding of operations that the graph runs in another order, epoch after
    epoch, and that still moves the losses well beyond the comparison's tolerance.)"""
    monkeypatch.setenv("X3D_DEPTHWISE_BACKWARD", "aten")
    monkeypatch.setattr(native, "enabled", False)
    logs = []
    for name, extra in (("eager", []), ("compiled", ["--compile", "aot_eager"])):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        run = tmp_path / name
        recipe.main(parse(*flags(data, run, "--dropout", "0", "--test-views", "0", "--lr", "0.001", *extra)))
        logs.append([json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()])
    shapes = set().union(*(r["train_shapes"] for r in logs[1] if "train_shapes" in r))
    assert len(shapes) > 4
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert len(shapes) <= graphs <= 2 * len(shapes)  # each shape once (a graph break would double a shape's count)
    for eager, compiled in zip(*logs):
        if "train_loss" in eager:
            assert compiled["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-4)
