"""Convert released X3D weights into this project's checkpoint format.

    python tools/convert_checkpoint.py X3D_M.pyth models/x3d_m_kinetics.pt                  # PyTorchVideo hub
    python tools/convert_checkpoint.py x3d_l.pyth models/x3d_l_kinetics.pt                  # PySlowFast zoo
    python tools/convert_checkpoint.py x3d_charades_rgb_sgd_024000.pt models/x3d_m_charades.pt  # original repo

Reads this project's checkpoints, PySlowFast and PyTorchVideo `.pyth` files and the original X3D-Multigrid `.pt`
files (see checkpoints.py), always with torch.load(weights_only=True): a file whose unpickling would run code is
refused. Writes {"model": state_dict, "model_cfg": ..., "converted_from": ..., "classes": [names]}, which --finetune
and predict.py load directly. Nothing is downloaded: get the files first (models/README.md).

Class names: --labels FILE, else the checkpoint's own, else Kinetics-400's (kinetics_400_classes.txt, FAIR's class
order) for a 400-class classifier, since FAIR's files carry no names; none for a re-initialised classifier.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere in the repository

from checkpoints import convert_checkpoint, read_class_names  # noqa: E402
from utils import run_cli, save_checkpoint  # noqa: E402
from x3d import MODELS  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="Checkpoint to convert (.pyth, .pt or this project's .pt).")
    p.add_argument("output", help="Where to write the converted checkpoint (parent folders are created).")
    p.add_argument("--model", choices=list(MODELS), default=None,
                   help="Variant to record. XS, S and M have the same weights shapes, so the weights alone cannot tell "
                        "them apart: default is the name stored in the checkpoint, else one in the file name "
                        "(X3D_XS.pyth), else x3d_m. L and XL are recognised from the weights.")
    p.add_argument("--num-classes", type=int, default=None,
                   help="Classes of the converted model. Default: the checkpoint's. A different number replaces the "
                        "classifier by a freshly initialised one (as fine-tuning would).")
    p.add_argument("--labels", default=None, metavar="FILE",
                   help="Class names to store, one per line in class-index order. Default: the checkpoint's own, else "
                        "Kinetics-400's in FAIR's order for 400 classes (FAIR's files carry no names).")
    return p


def main(args: argparse.Namespace) -> None:
    classes = read_class_names(args.labels) if args.labels else None
    converted, notes = convert_checkpoint(args.input, model=args.model, num_classes=args.num_classes, classes=classes)
    save_checkpoint(converted, args.output)
    cfg = converted["model_cfg"]
    for note in notes:
        print(note)
    print(f"wrote {args.output}: {cfg['name']}, {cfg['num_classes']} classes, {len(converted['model'])} tensors; "
          f"default input {cfg['frames']} frames at sampling rate {cfg['sampling_rate']}, train crop "
          f"{cfg['train_crop']}, test crop {cfg['test_crop']}")


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser().parse_args()))
