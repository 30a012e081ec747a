"""Checkpoint files (atomic writes, safe loading, clear errors), devices, logging, the command-line runner, malloc."""

import argparse
import os
import pickle
import platform
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import utils
from utils import (
    CheckpointError,
    UnsafeCheckpointError,
    UserError,
    load_checkpoint_file,
    load_run_checkpoint,
    save_checkpoint,
    save_run_checkpoint,
)


def test_save_and_load_round_trip(tmp_path):
    obj = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "epoch": 3, "args": {"lr": 0.1}, "classes": ["a", "b"]}
    save_checkpoint(obj, tmp_path / "a.pt", tmp_path / "sub" / "b.pt")
    for name in ("a.pt", "sub/b.pt"):
        loaded = load_checkpoint_file(tmp_path / name)
        assert torch.equal(loaded["model"]["w"], obj["model"]["w"])
        assert loaded["epoch"] == 3 and loaded["classes"] == ["a", "b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "sub"]  # no temp files left behind


def test_code_executing_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "args": argparse.Namespace(lr=0.1)}, path)  # unpickling builds a Namespace object
    with pytest.raises(CheckpointError, match="refused.*execute code"):
        load_checkpoint_file(path)


class LeavesATrace:
    """Unpickling this calls os.makedirs(path): harmless, but it shows whether loading ran code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return os.makedirs, (self.path,)


def write_payload(form: str, path, marker) -> None:
    """A checkpoint-looking file whose full unpickling would create the folder `marker`."""
    obj = {"model_state": {"blocks.0.conv.conv_t.weight": torch.zeros(1)}, "cfg": LeavesATrace(str(marker))}
    if form == "zip":
        torch.save(obj, path)
    elif form == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    elif form == "raw_pickle":
        path.write_bytes(pickle.dumps(obj))
    else:  # a .pyth as the model zoos name them: a torch.save zip with the model under model_state
        torch.save(obj, path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on the raw pickle, before refusing it
@pytest.mark.parametrize("form", ["zip", "legacy", "raw_pickle", "pyth"])
def test_malicious_checkpoint_is_refused_as_code_not_called_corrupt(tmp_path, form):
    path = tmp_path / ("x3d.pyth" if form == "pyth" else "checkpoint.pt")
    write_payload(form, path, tmp_path / "trace")
    with pytest.raises(UnsafeCheckpointError, match=r"refused: unpickling it would execute code \(it imports and "
                                                    r"calls (os|posix)\.makedirs\)") as raised:
        load_checkpoint_file(path)
    assert "corrupt" not in str(raised.value)
    assert not (tmp_path / "trace").exists()  # nothing ran
    # The payload is real: a plain, unsafe load of the same file does run it.
    with open(path, "rb") as f:
        pickle.load(f) if form == "raw_pickle" else torch.load(f, weights_only=False)
    assert (tmp_path / "trace").is_dir()


def test_malicious_checkpoint_in_a_run_folder_stops_the_run_loudly(tmp_path):
    save_run_checkpoint({"epoch": 1}, tmp_path)
    save_run_checkpoint({"epoch": 2}, tmp_path)
    write_payload("zip", tmp_path / "checkpoint.pt", tmp_path / "trace")
    with pytest.raises(UnsafeCheckpointError, match="would execute code.*replaced.*not resuming.*checkpoint_prev"):
        load_run_checkpoint(tmp_path)
    # Not handled as damage: the file stays for inspection, nothing is moved aside, nothing ran.
    assert not (tmp_path / "checkpoint_damaged.pt").exists() and (tmp_path / "checkpoint.pt").exists()
    assert load_checkpoint_file(tmp_path / "checkpoint_prev.pt")["epoch"] == 1 and not (tmp_path / "trace").exists()


def test_missing_checkpoint_points_to_the_models_readme(tmp_path):
    with pytest.raises(CheckpointError, match=r"no such checkpoint file.*models/README\.md"):
        load_checkpoint_file(tmp_path / "x3d_m_kinetics.pt")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing", "not_a_dict"])
def test_broken_files_are_reported_with_their_path(tmp_path, damage):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"model": {"w": torch.ones(1000)}}, path)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:300])
    elif damage == "garbage":
        path.write_bytes(b"this is not a checkpoint" * 10)
    elif damage == "missing":
        path.unlink()
    else:
        torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint_file(path)


def test_killed_writer_leaves_previous_checkpoint_intact(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"model": {"w": torch.zeros(3)}, "epoch": 1}, path)
    # A writer killed while writing a large checkpoint: the old file must survive untouched.
    script = textwrap.dedent(f"""
        import os, signal, torch, utils
        real_save = torch.save
        def save_then_die(obj, f):
            real_save(obj, f)
            os.kill(os.getpid(), signal.SIGKILL)  # dies after writing the temp file, before the rename
        torch.save = save_then_die
        utils.save_checkpoint({{"model": {{"w": torch.ones(3)}}, "epoch": 2}}, {str(path)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=os.getcwd())
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint_file(path)["epoch"] == 1


def test_resuming_past_a_damaged_checkpoint_keeps_the_good_one(tmp_path):
    save_run_checkpoint({"epoch": 1}, tmp_path)
    save_run_checkpoint({"epoch": 2}, tmp_path)
    (tmp_path / "checkpoint.pt").write_bytes(b"\x00" * 100)
    state, path = load_run_checkpoint(tmp_path)
    assert state["epoch"] == 1 and path == tmp_path / "checkpoint_prev.pt"
    assert (tmp_path / "checkpoint_damaged.pt").read_bytes() == b"\x00" * 100
    # The next save must not keep the damaged file as the previous checkpoint in place of the good one.
    save_run_checkpoint({"epoch": 2}, tmp_path)
    assert load_checkpoint_file(tmp_path / "checkpoint.pt")["epoch"] == 2
    assert load_checkpoint_file(tmp_path / "checkpoint_prev.pt")["epoch"] == 1


def test_run_folder_always_has_a_latest_checkpoint(tmp_path):
    save_run_checkpoint({"epoch": 1}, tmp_path)
    save_run_checkpoint({"epoch": 2}, tmp_path)
    assert load_checkpoint_file(tmp_path / "checkpoint.pt")["epoch"] == 2
    assert load_checkpoint_file(tmp_path / "checkpoint_prev.pt")["epoch"] == 1
    # Killed while writing the third: checkpoint.pt must still be there (a reader polling it never finds it missing).
    script = textwrap.dedent(f"""
        import os, signal, torch, utils
        real_save = torch.save
        def save_then_die(obj, f):
            real_save(obj, f)
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = save_then_die
        utils.save_run_checkpoint({{"epoch": 3}}, {str(tmp_path)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=os.getcwd())
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint_file(tmp_path / "checkpoint.pt")["epoch"] == 2
    assert load_checkpoint_file(tmp_path / "checkpoint_prev.pt")["epoch"] == 2
    assert any(tmp_path.glob(".checkpoint.pt.tmp*"))  # the killed writer's temp file
    # The next save leaves no hidden file behind, though the two names were links to one file.
    save_run_checkpoint({"epoch": 3}, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "checkpoint_prev.pt"]
    assert load_checkpoint_file(tmp_path / "checkpoint.pt")["epoch"] == 3
    assert load_checkpoint_file(tmp_path / "checkpoint_prev.pt")["epoch"] == 2


def test_a_log_line_cut_short_is_ended_and_skipped_with_a_warning(tmp_path, capsys):
    logger = utils.RunLogger(tmp_path)
    logger.log({"val_top1": 50.0}, 1)
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"epoch": 2, "val_to')  # killed while appending
    logger.log({"test_top1": 75.0}, 2)
    records = utils.read_log(tmp_path / "log.jsonl")
    assert records == [{"epoch": 1, "val_top1": 50.0}, {"epoch": 2, "test_top1": 75.0}]
    assert f"warning: {tmp_path / 'log.jsonl'}, line 2: not a JSON record" in capsys.readouterr().err
    assert utils.read_log(tmp_path / "missing.jsonl") == []


# ----------------------------------------------------------------------------------------------------------------------
# Devices, the command-line runner, --restart, TensorBoard
# ----------------------------------------------------------------------------------------------------------------------
def test_gpu_flag_without_cuda_stops_and_says_what_torch_reports(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # launch() sets it; restored after the test
    ran = []
    for gpu, device in [("0,1", "auto"), (None, "cuda")]:
        with pytest.raises(SystemExit) as stopped:
            utils.launch(argparse.Namespace(gpu=gpu, device=device, nproc=1), ran.append)
        err = capsys.readouterr().err
        assert stopped.value.code == 2 and not ran
        assert "CUDA is not available" in err and f"torch {torch.__version__}" in err and "--device cpu" in err
        assert "CUDA devices visible" in err and "Traceback" not in err
    # Asking for the CPU explicitly runs, and the device line says why it is the CPU.
    with pytest.raises(SystemExit) as stopped:
        utils.launch(argparse.Namespace(gpu="0", device="cpu", nproc=1), ran.append)
    assert stopped.value.code == 0 and len(ran) == 1
    assert utils.init_distributed("cpu") == torch.device("cpu")
    assert utils.describe_device(torch.device("cpu")).startswith("device: cpu (CUDA not available: torch ")


def test_user_errors_end_with_a_message_and_code_2(capsys):
    def fails(args):
        raise UserError("--frob 3 must be even")

    assert utils.run_cli(fails, argparse.Namespace()) == 2
    assert capsys.readouterr().err == "error: --frob 3 must be even\n"
    with pytest.raises(ValueError):  # a bug is not a user error: its traceback stays
        utils.run_cli(lambda args: int("x"), argparse.Namespace())


def test_restart_moves_the_previous_run_aside(tmp_path):
    assert utils.start_over(tmp_path) is None
    save_run_checkpoint({"epoch": 1}, tmp_path)
    save_run_checkpoint({"epoch": 2}, tmp_path)
    (tmp_path / "log.jsonl").write_text("{}\n")
    (tmp_path / "keep.txt").write_text("not the run's")
    assert utils.start_over(tmp_path) == tmp_path / "previous_1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "previous_1"]
    assert load_checkpoint_file(tmp_path / "previous_1" / "checkpoint.pt")["epoch"] == 2
    save_run_checkpoint({"epoch": 1}, tmp_path)
    assert utils.start_over(tmp_path) == tmp_path / "previous_2"


def test_tensorboard_writes_events_or_says_what_is_missing(tmp_path, monkeypatch):
    logger = utils.RunLogger(tmp_path, tensorboard=True)
    logger.log({"train_loss": 1.5, "shape": "4x32"}, 1.0)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(UserError, match="--tensorboard needs the tensorboard package.*pip install tensorboard"):
        utils.RunLogger(tmp_path / "other", tensorboard=True)


class _WorkerState(torch.utils.data.Dataset):
    """Each item: the worker's CPU priority (niceness) and whether it ignores Ctrl-C."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> tuple[int, bool]:
        return os.nice(0), signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_loader_workers_decode_at_the_lowest_priority_and_ignore_ctrl_c():
    loader = torch.utils.data.DataLoader(_WorkerState(), num_workers=1, worker_init_fn=utils.init_loader_worker,
                                         batch_size=None)
    (niceness, ignores_sigint), = list(loader)
    assert niceness == 19 and ignores_sigint
    assert os.nice(0) < 19  # the training process itself keeps its priority


_ALLOCATE = textwrap.dedent("""
    import resource, statistics, sys, torch, utils
    kept = utils.keep_freed_memory() if sys.argv[1] == "kept" else False
    faults = []
    for _ in range(20):  # steps, each allocating (and freeing) a 40 MiB activation
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(10 << 20)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(kept, statistics.median(faults[10:]))  # the heap settles in the first few
""")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a setting of glibc's malloc")
def test_freed_memory_is_kept_for_the_next_step():
    def page_faults(mode: str) -> tuple[bool, float]:
        kept, faults = subprocess.run([sys.executable, "-c", _ALLOCATE, mode], cwd=os.getcwd(), check=True,
                                      capture_output=True, text=True).stdout.split()
        return kept == "True", float(faults)

    kept, faults_kept = page_faults("kept")
    _, faults_default = page_faults("default")
    assert kept
    assert faults_kept < 50  # the same pages again
    # By default each allocation is a fresh mapping, its pages zero-filled: 10240 of 4 KiB (fewer with huge pages).
    assert faults_default > 10 * (faults_kept + 1)
