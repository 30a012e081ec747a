"""Kinetics-400 class names: the shipped list in FAIR's class order, names kept through conversion, and predict.py
printing names for FAIR-format weights that carry none."""

import av
import numpy as np
import pytest
import torch
from test_checkpoints import TO_PYSLOWFAST, our_model, rename

import predict
from checkpoints import KINETICS_400_CLASSES_FILE, convert_checkpoint, kinetics_400_classes
from tools import convert_checkpoint as convert_tool
from utils import CheckpointError, UserError, load_checkpoint_file

# Positions from FAIR's kinetics_classnames.json (name -> id), the file PySlowFast's demo and PyTorchVideo's hub use.
KNOWN = {0: "abseiling", 1: "air drumming", 149: "headbanging", 196: "massaging person's head",
         208: "passing American football (in game)", 232: "playing guitar", 360: "tobogganing", 399: "zumba"}
# Classifier biases that make these classes the top 5, in this order.
TOP5 = {360: 6.0, 0: 5.0, 399: 4.0, 232: 3.0, 149: 2.0}


def test_kinetics_400_list_is_fairs_order():
    names = kinetics_400_classes()
    assert len(names) == 400 and len(set(names)) == 400
    assert all(names[i] == name for i, name in KNOWN.items())
    assert names == sorted(names)  # FAIR numbers the official CSV's labels alphabetically
    lines = KINETICS_400_CLASSES_FILE.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and lines[:-1] == names  # one name per line, nothing else


def fair_checkpoint(tmp_path, num_classes=400, top=None, name="x3d_xs.pyth"):
    """A PySlowFast-format file of a random X3D-XS whose classifier outputs only its biases, `top` (default TOP5)
    {class: bias} and 0 elsewhere, whatever the clip. Like FAIR's files, it has no class names."""
    model = our_model("x3d_xs", num_classes=num_classes)
    with torch.no_grad():
        model.head.classifier.weight.zero_()
        model.head.classifier.bias.zero_()
        for i, bias in (TOP5 if top is None else top).items():
            model.head.classifier.bias[i] = bias
    path = tmp_path / name
    torch.save({"model_state": {rename(k, TO_PYSLOWFAST): v for k, v in model.state_dict().items()}, "epoch": 300},
               path)
    return path


def test_conversion_attaches_kinetics_names_to_fair_weights(tmp_path):
    converted, notes = convert_checkpoint(fair_checkpoint(tmp_path))
    assert converted["classes"] == kinetics_400_classes()
    assert "Kinetics-400" in converted["classes_from"] and "class names: Kinetics-400" in notes[-1]
    # Another number of classes: a fresh classifier has no names; other weights without names get none either.
    converted, notes = convert_checkpoint(fair_checkpoint(tmp_path), num_classes=7)
    assert "classes" not in converted and notes[-1] == "class names: none for a re-initialised classifier"
    converted, _ = convert_checkpoint(fair_checkpoint(tmp_path, num_classes=157, top={}, name="charades.pyth"))
    assert "classes" not in converted
    with pytest.raises(CheckpointError, match="--labels gives 3 class names, but the model converted from .* has 400"):
        convert_checkpoint(fair_checkpoint(tmp_path), classes=["a", "b", "c"])


def test_conversion_keeps_a_checkpoints_own_names(tmp_path):
    model = our_model("x3d_xs", num_classes=400)
    own = [f"action {i}" for i in range(400)]
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "classes": own}, path)
    converted, notes = convert_checkpoint(path)
    assert converted["classes"] == own and notes[-1] == "class names: stored in the checkpoint"
    # Names that are only the indices (a list file without labels.txt) say nothing: Kinetics-400's replace them.
    torch.save({"model": model.state_dict(), "classes": [str(i) for i in range(400)]}, path)
    assert convert_checkpoint(path)[0]["classes"] == kinetics_400_classes()


def test_convert_tool_stores_names_and_takes_labels(tmp_path):
    source = fair_checkpoint(tmp_path)
    out = tmp_path / "models" / "x3d_xs_kinetics.pt"
    convert_tool.main(convert_tool.get_args_parser().parse_args([str(source), str(out)]))
    assert load_checkpoint_file(out)["classes"] == kinetics_400_classes()
    # Re-converting a converted file keeps them.
    again = tmp_path / "again.pt"
    convert_tool.main(convert_tool.get_args_parser().parse_args([str(out), str(again)]))
    assert load_checkpoint_file(again)["classes"] == kinetics_400_classes()

    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"mine {i}" for i in range(400)) + "\n\n")
    convert_tool.main(convert_tool.get_args_parser().parse_args([str(source), str(out), "--labels", str(labels)]))
    ckpt = load_checkpoint_file(out)
    assert ckpt["classes"][360] == "mine 360" and len(ckpt["classes"]) == 400 and ckpt["classes_from"] == "as given"


# ----------------------------------------------------------------------------------------------------------------------
# predict.py
# ----------------------------------------------------------------------------------------------------------------------
def write_video(path, num_frames=24, width=64, height=48) -> str:
    """A small H.264 video: a bright square drifting over a grey background."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(num_frames):
            pixels = np.full((height, width, 3), 90, dtype=np.uint8)
            pixels[10:26, i:i + 16] = 230
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def run_predict(video, checkpoint, *flags):
    return predict.main(predict.get_args_parser().parse_args(
        [video, "--checkpoint", str(checkpoint), "--views", "1", "--crops", "1", "--model", "x3d_xs", *flags]))


def test_predict_prints_kinetics_names_for_a_converted_fair_checkpoint(tmp_path, capsys):
    video = write_video(tmp_path / "clip.mp4")
    converted = tmp_path / "x3d_xs_kinetics.pt"
    convert_tool.main(convert_tool.get_args_parser().parse_args([str(fair_checkpoint(tmp_path)), str(converted)]))
    capsys.readouterr()
    result = run_predict(video, converted)
    out = capsys.readouterr().out
    expected = [kinetics_400_classes()[i] for i in TOP5]  # tobogganing, abseiling, zumba, playing guitar, headbanging
    assert [name for name, _ in result] == expected
    assert [line.split("%  ", 1)[1] for line in out.splitlines()[1:]] == expected
    assert "class names: stored in the checkpoint" in out.splitlines()[0] and "class 360" not in out

    # The unconverted FAIR file gets the same names; --labels wins over both.
    result = run_predict(video, fair_checkpoint(tmp_path))
    assert [name for name, _ in result] == expected
    assert "class names: Kinetics-400 in FAIR's order" in capsys.readouterr().out
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"mine {i}" for i in range(400)))
    assert run_predict(video, converted, "--labels", str(labels))[0][0] == "mine 360"
    labels.write_text("too\nfew\n")
    with pytest.raises(UserError, match="2 class names, but the model has 400 classes"):
        run_predict(video, converted, "--labels", str(labels))


def test_predict_prints_indices_without_names(tmp_path, capsys):
    video = write_video(tmp_path / "clip.mp4")
    result = run_predict(video, fair_checkpoint(tmp_path, num_classes=10, top={7: 2.0, 3: 1.0}), "--topk", "2")
    assert [name for name, _ in result] == ["class 7", "class 3"]
    assert "class names: none known, so indices" in capsys.readouterr().out
