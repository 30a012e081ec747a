"""Checkpoint files: atomic writes, safe loading, clear errors."""

import argparse
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from utils import CheckpointError, load_checkpoint_file, load_run_checkpoint, save_checkpoint, save_run_checkpoint


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
