"""tools/plot_run.py on hand-written run folders: what curves.png draws (loss, top-1/top-5, LR, multigrid stages and
their shape labels where they fit), a run folder or its log.jsonl as the argument, malformed logs."""

import json

import pytest
from matplotlib import pyplot as plt
from PIL import Image

from tools import plot_run

LOG = [  # a 6-epoch multigrid run: validation every 3 epochs, then the test
    {"epoch": 1, "train_loss": 2.1, "train_top1": 15.0, "train_lr": 0.08, "shape": "2x40"},
    {"epoch": 2, "train_loss": 1.5, "train_top1": 40.0, "train_lr": 0.11, "shape": "2x40"},
    {"epoch": 3, "train_loss": 0.8, "train_top1": 65.0, "train_lr": 0.05, "shape": "4x40", "val_top1": 70.0,
     "val_top5": 95.0},
    {"epoch": 4, "train_loss": 0.5, "train_top1": 78.0, "train_lr": 0.02, "shape": "8x56"},
    {"epoch": 5, "train_loss": 0.4, "train_top1": 84.0, "train_lr": 0.01, "shape": "8x56"},
    {"epoch": 6, "train_loss": 0.3, "train_top1": 88.0, "train_lr": 0.0, "shape": "8x56", "val_top1": 80.0,
     "val_top5": 98.5},
    {"epoch": 6, "test_top1": 82.0, "test_top5": 99.0, "test_videos": 400},
]


def stage(start, end, frames, crop):
    return {"start": start, "end": end, "frames": frames, "crop": crop, "batch_size": 64 // frames, "fine_tune": False}


SCHEDULE = {"stages": [stage(0, 2, 2, 40), stage(2, 3, 4, 40), stage(3, 6, 8, 56)],
            "lr": [[e / 4, 0.1 * (1 - e / 24)] for e in range(25)]}


@pytest.fixture()
def run(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in LOG))
    (folder / "schedule.json").write_text(json.dumps(SCHEDULE))
    return folder


def series(ax) -> dict:
    """{label: (xs, ys)} of the labelled lines of a panel."""
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()
            if not line.get_label().startswith("_")}


def stage_lines(ax) -> list[float]:
    """x of the vertical lines of a panel (the stage starts)."""
    return [line.get_xdata()[0] for line in ax.get_lines() if line.get_label().startswith("_")
            and len(set(line.get_xdata())) == 1]


def stage_labels(fig) -> list[str]:
    return [t.get_text().strip() for t in fig.axes[0].texts]


def test_curves_show_loss_accuracy_lr_and_stages():
    fig = plot_run.curves_figure(LOG, SCHEDULE)
    loss, acc, lr = fig.axes
    assert series(loss) == {"train_loss": ([1, 2, 3, 4, 5, 6], [2.1, 1.5, 0.8, 0.5, 0.4, 0.3])}
    drawn = series(acc)
    assert list(drawn) == ["train_top1", "val_top1", "val_top5", "test_top1", "test_top5"]
    assert drawn["val_top5"] == ([3, 6], [95.0, 98.5]) and drawn["test_top5"] == ([6], [99.0])
    assert drawn["val_top1"] == ([3, 6], [70.0, 80.0])
    assert series(lr)["train_lr"] == ([1, 2, 3, 4, 5, 6], [0.08, 0.11, 0.05, 0.02, 0.01, 0.0])
    assert len(series(lr)["lr (schedule.json)"][0]) == 25  # the schedule's LR function, between the epoch points
    for ax in fig.axes:
        assert stage_lines(ax) == [0, 2, 3]
    assert stage_labels(fig) == ["2×40", "4×40", "8×56"]  # every stage is wide enough here
    plt.close(fig)


def test_stage_labels_only_where_they_fit():
    # A 60-epoch schedule whose middle stage lasts one epoch: too narrow for "8×160" at this width.
    schedule = {"stages": [stage(0, 29, 4, 112), stage(29, 30, 8, 160), stage(30, 60, 16, 224)], "lr": []}
    rows = [{"epoch": e, "train_loss": 1 / e, "train_lr": 0.1} for e in range(1, 61)]
    fig = plot_run.curves_figure(rows, schedule)
    assert stage_lines(fig.axes[2]) == [0, 29, 30]
    assert stage_labels(fig) == ["4×112", "16×224"]
    plt.close(fig)


def test_curves_without_schedule_or_accuracy():
    fig = plot_run.curves_figure([{"epoch": 1, "train_loss": 1.0}, {"epoch": 2, "train_loss": 0.5}])
    assert stage_lines(fig.axes[0]) == [] and stage_labels(fig) == []
    assert series(fig.axes[1]) == {} and fig.axes[1].get_legend() is None  # nothing to draw, no empty legend
    plt.close(fig)


@pytest.mark.parametrize("given", ["folder", "log"])
def test_main_takes_a_run_folder_or_its_log(run, tmp_path, given, capsys):
    arg = run if given == "folder" else run / "log.jsonl"
    written = plot_run.main(plot_run.get_args_parser().parse_args([str(arg)]))
    assert written == [run / "curves.png", run / "schedule.png"]
    with Image.open(run / "curves.png") as image:
        assert image.size == (1000, 900)
    assert f"wrote {run / 'curves.png'}" in capsys.readouterr().out

    (run / "schedule.json").unlink()  # a run without a schedule: the curves alone
    out = tmp_path / "plots"
    assert plot_run.main(plot_run.get_args_parser().parse_args([str(arg), "--out-dir", str(out)])) == [
        out / "curves.png"]


def test_malformed_or_missing_log(run):
    with (run / "log.jsonl").open("a") as f:
        f.write("{not json\n")
    with pytest.raises(SystemExit, match=r"log.jsonl:8: not a JSON line"):
        plot_run.main(plot_run.get_args_parser().parse_args([str(run)]))
    with pytest.raises(SystemExit, match="no such log file"):
        plot_run.main(plot_run.get_args_parser().parse_args([str(run / "nowhere")]))
