"""Decoded + augmented clips per second in one process (= one data-loader worker), per input format and clip shape.

    python benchmarks/bench_data.py            # about 1.5 minutes on 2 CPU cores
    python benchmarks/bench_data.py --quick    # a rough table in about 30 seconds

It writes its own inputs to a temporary folder: Kinetics-like 340x256 H.264 clips (10 s at 30 fps) with a keyframe
every 2 s and with a single keyframe (what ffmpeg's default keyint gives a re-encoded 10 s clip), the same frames as
a JPEG folder and as a 640x480 JPEG folder (Charades-like frames), and 170x128 demo-sized clips (a keyframe every 16
frames, as tools/make_demo_data.py writes them, and a single keyframe) and folder. The keyframe-every-2-s videos
are also written with x264's fastdecode tuning (no CABAC, no deblocking filter), as tools/prepare_kinetics.py and
tools/make_demo_data.py encode by default. Each cell reads clips at random
start positions with `video_io.read_frames` and augments them with `transforms.train_clip` (or `test_clip`), one
thread, as a data-loader worker does; after the first clip of a file, video_io reads an MP4 from the packet index it
kept. The "first read" rows forget that index before every clip, as a worker's first clip of a video is read: from
the index file written beside the video (`video_io.write_packet_index`, as tools/prepare_kinetics.py writes them), or,
from a copy of the video without one, through FFmpeg's demuxer. The "one decoding pass" rows decode every frame up to
the last one needed, the usual simple reader, for comparison with video_io's reader.
"""

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import av
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere in the repository

import transforms  # noqa: E402
import video_io  # noqa: E402


class Shape(NamedTuple):
    """A clip shape: frames x sampling rate, crop, short-side jitter (None: a 3-crop test view), source size."""

    name: str
    frames: int
    rate: int
    crop: int
    jitter: tuple[int, int] | None
    source: str  # "kinetics" (340x256) or "demo" (170x128)


SHAPES = [
    Shape("X3D-XS train 4x12 @160", 4, 12, 160, (182, 228), "kinetics"),
    Shape("X3D-XS test 4x12 @182", 4, 12, 182, None, "kinetics"),
    Shape("X3D-M train 16x5 @224", 16, 5, 224, (256, 320), "kinetics"),
    Shape("X3D-M long cycle 4x20 @158", 4, 20, 158, (181, 226), "kinetics"),
    # make demo's recipe: base shape, short cycle's smallest crop, long cycle's coarsest shape (rate 8-32), test view
    Shape("demo 8x8 @56", 8, 8, 56, (64, 80), "demo"),
    Shape("demo short cycle 8x8 @28", 8, 8, 28, (32, 80), "demo"),
    Shape("demo long cycle 2x20 @40", 2, 20, 40, (46, 80), "demo"),
    Shape("demo test 8x8 @64", 8, 8, 64, None, "demo"),
]


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options of the data benchmark."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Read 6 clips per cell instead of --clips: a rough table.")
    parser.add_argument(
        "--clips", type=int, default=24, help="Clips read per cell; 24 keeps the run near 1.5 minutes on 2 cores."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the generated videos and of the clip positions.")
    return parser


# ----------------------------------------------------------------------------------------------------------------
# Generated inputs
# ----------------------------------------------------------------------------------------------------------------


def synthetic_frames(width: int, height: int, num_frames: int, seed: int) -> list[np.ndarray]:
    """Textured background, a moving box, a sweeping line and sensor-like noise: compresses like real footage."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = np.stack([xx / width * 200, yy / height * 200, (xx + yy) / (width + height) * 255], axis=-1)
    blocks = np.kron(rng.integers(0, 255, (8, 8, 3)), np.ones((height // 8 + 1, width // 8 + 1, 1)))
    background = 0.6 * ramp + 0.4 * blocks[:height, :width]
    box = max(8, width // 8)
    frames = []
    for i in range(num_frames):
        frame = background.copy()
        x = (3 * i) % (width - box)
        y = int(height / 2 + height / 3 * np.sin(i / 15))
        frame[max(0, y - box // 2) : y + box // 2, x : x + box] = (255, 40, 40)
        frame[:, (5 * i) % width] = 255
        frame += rng.normal(0, 6, frame.shape)
        frames.append(np.clip(frame, 0, 255).astype(np.uint8))
    return frames


def write_mp4(path: str, frames: list[np.ndarray], keyframe_interval: int, fast_decode: bool = False) -> None:
    """H.264 at 30 fps, x264 with B-frames, like a re-encoded Kinetics clip; `fast_decode`: x264's fastdecode tuning."""
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = keyframe_interval
        stream.options = {"crf": "20", "preset": "veryfast", "sc_threshold": "0",
                          **({"tune": "fastdecode"} if fast_decode else {})}
        for pixels in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_jpegs(folder: str, frames: list[np.ndarray], size: tuple[int, int] | None = None) -> None:
    """The original repo's frame_00001.jpg layout, quality 90."""
    os.makedirs(folder)
    for i, pixels in enumerate(frames):
        image = Image.fromarray(pixels)
        if size is not None:
            image = image.resize(size, Image.BILINEAR)
        image.save(os.path.join(folder, f"frame_{i + 1:05d}.jpg"), quality=90)


def make_inputs(root: str, seed: int) -> dict[str, str]:
    """Write every input once; returns name -> path."""
    kinetics = synthetic_frames(340, 256, 300, seed)
    demo = synthetic_frames(170, 128, 150, seed + 1)
    paths = {
        "kinetics_gop2s": os.path.join(root, "kinetics_gop2s.mp4"),
        "kinetics_gop10s": os.path.join(root, "kinetics_gop10s.mp4"),
        "kinetics_jpeg": os.path.join(root, "kinetics_jpeg"),
        "charades_jpeg": os.path.join(root, "charades_jpeg"),
        "demo_gop16": os.path.join(root, "demo_gop16.mp4"),
        "demo_gop150": os.path.join(root, "demo_gop150.mp4"),
        "demo_jpeg": os.path.join(root, "demo_jpeg"),
        "kinetics_gop2s_fast": os.path.join(root, "kinetics_gop2s_fast.mp4"),
        "demo_gop16_fast": os.path.join(root, "demo_gop16_fast.mp4"),
    }
    write_mp4(paths["kinetics_gop2s"], kinetics, 60)
    write_mp4(paths["demo_gop16"], demo, 16)
    write_mp4(paths["kinetics_gop2s_fast"], kinetics, 60, fast_decode=True)
    write_mp4(paths["demo_gop16_fast"], demo, 16, fast_decode=True)
    for name in ("kinetics_gop2s_fast", "demo_gop16_fast"):
        video_io.write_packet_index(paths[name])
    for name in ("kinetics_gop2s", "demo_gop16"):  # the videos with an index file, and copies without
        video_io.write_packet_index(paths[name])
        paths[f"{name}_unindexed"] = paths[name].replace(".mp4", "_unindexed.mp4")
        shutil.copyfile(paths[name], paths[f"{name}_unindexed"])
    write_mp4(paths["kinetics_gop10s"], kinetics, 300)
    write_jpegs(paths["kinetics_jpeg"], kinetics)
    write_jpegs(paths["charades_jpeg"], kinetics, size=(640, 480))
    write_mp4(paths["demo_gop150"], demo, 150)
    write_jpegs(paths["demo_jpeg"], demo)
    return paths


# ----------------------------------------------------------------------------------------------------------------
# Readers and the timing loop
# ----------------------------------------------------------------------------------------------------------------


def read_one_pass(path: str, indices: list[int], min_short_side: int | None = None) -> torch.Tensor:
    """The simple reader to compare with: decode every frame from the start up to the last index needed."""
    wanted, last = set(indices), max(indices)
    frames = {}
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                frames[i] = frame.to_ndarray(format="rgb24", threads=1)  # video_io's conversion
            if i >= last:
                break
    return torch.from_numpy(np.stack([frames[i] for i in indices])).permute(0, 3, 1, 2)


def reader(backend: str, reduced: bool = False, first_read: bool = False) -> Callable[..., torch.Tensor]:
    """video_io.read_frames with a fixed backend; `reduced` passes min_short_side (used by JPEG folders).

    A process reads an MP4 it has read before from its packet index (video_io); `first_read` forgets the index before
    every read, so that each one is read as a worker's first clip of a video is.
    """

    def read(path: str, indices: list[int], min_short_side: int) -> torch.Tensor:
        if first_read:
            video_io._forget_packet_index(path)
        return video_io.read_frames(path, indices, backend=backend, min_short_side=min_short_side if reduced else None)

    return read


def preloaded() -> Callable[..., torch.Tensor]:
    """A reader that decodes one clip per (input, length) on its first call and hands it back after that."""
    cache: dict[tuple[str, int], torch.Tensor] = {}

    def read(path: str, indices: list[int], min_short_side: int) -> torch.Tensor:
        key = (path, len(indices))
        if key not in cache:
            cache[key] = video_io.read_frames(path, indices)
        return cache[key]

    return read


class Row(NamedTuple):
    """A table row: its label, the input for each source size (None: no cell) and how clips are read."""

    label: str
    sources: dict[str, str | None]
    read: Callable[..., torch.Tensor]


def benchmark_rows(paths: dict[str, str]) -> list[Row]:
    """Every (input format, reader) pair the table compares."""
    gop_2s = {"kinetics": paths["kinetics_gop2s"], "demo": paths["demo_gop16"]}
    unindexed = {"kinetics": paths["kinetics_gop2s_unindexed"], "demo": paths["demo_gop16_unindexed"]}
    single_keyframe = {"kinetics": paths["kinetics_gop10s"], "demo": paths["demo_gop150"]}
    fast = {"kinetics": paths["kinetics_gop2s_fast"], "demo": paths["demo_gop16_fast"]}
    rows = [
        Row("mp4, keyframe every 2 s (demo: 16 frames): video_io PyAV", gop_2s, reader("pyav")),
        Row("mp4, keyframe every 2 s (demo: 16 frames), x264 fastdecode: video_io PyAV", fast, reader("pyav")),
        Row("mp4, keyframe every 2 s (demo: 16 frames): video_io PyAV, first read, index file", gop_2s,
            reader("pyav", first_read=True)),
        Row("mp4, keyframe every 2 s (demo: 16 frames): video_io PyAV, first read, no index file", unindexed,
            reader("pyav", first_read=True)),
        Row("mp4, keyframe every 2 s (demo: 16 frames): one decoding pass", gop_2s, read_one_pass),
        Row("mp4, one keyframe: video_io PyAV", single_keyframe, reader("pyav")),
        Row("mp4, one keyframe: one decoding pass", single_keyframe, read_one_pass),
    ]
    if "torchcodec" in video_io.available_backends():
        rows += [
            Row("mp4, keyframe every 2 s (demo: 16 frames): torchcodec", gop_2s, reader("torchcodec")),
            Row("mp4, one keyframe: torchcodec", single_keyframe, reader("torchcodec")),
        ]
    jpeg = {"kinetics": paths["kinetics_jpeg"], "demo": paths["demo_jpeg"]}
    charades = {"kinetics": paths["charades_jpeg"], "demo": None}
    return rows + [
        Row("JPEG 340x256 (demo 170x128): full size", jpeg, reader("auto")),
        Row("JPEG 340x256 (demo 170x128): reduced size", jpeg, reader("auto", reduced=True)),
        Row("JPEG 640x480: full size", charades, reader("auto")),
        Row("JPEG 640x480: reduced size", charades, reader("auto", reduced=True)),
        Row("transforms only (decoded beforehand)", jpeg, preloaded()),
    ]


def time_clip(read: Callable[..., torch.Tensor], path: str, shape: Shape, start: int, seed: int) -> float:
    """CPU seconds to read and augment one clip of `shape` starting at frame `start`."""
    indices = list(range(start, start + (shape.frames - 1) * shape.rate + 1, shape.rate))
    # The short side the transforms will need: reduced-size JPEG decoding may go down to it.
    min_short_side = shape.jitter[0] if shape.jitter else shape.crop
    tic = time.process_time()
    clip = read(path, indices, min_short_side)
    if shape.jitter:
        transforms.train_clip(clip, shape.crop, shape.jitter, torch.Generator().manual_seed(seed))
    else:
        transforms.test_clip(clip, shape.crop, seed % 3)
    return time.process_time() - tic


def measure_shape(rows: list[Row], shape: Shape, clips: int, seed: int) -> dict[str, float]:
    """Clips per CPU-second of every row at one shape; rows take turns in 3 rounds so that load spikes spread out."""
    path_of = {row.label: row.sources[shape.source] for row in rows if row.sources[shape.source] is not None}
    num_frames = video_io.probe(next(iter(path_of.values()))).num_frames  # all inputs of a source have one length
    span = (shape.frames - 1) * shape.rate + 1
    starts = np.random.default_rng(seed).integers(0, max(1, num_frames - span + 1), clips + 1)
    elapsed = dict.fromkeys(path_of, 0.0)
    for row in rows:  # warm-up: file caches, first-call set-up
        if row.label in path_of:
            time_clip(row.read, path_of[row.label], shape, int(starts[0]), 0)
    for chunk in np.array_split(np.arange(1, clips + 1), 3):
        for row in rows:
            if row.label in path_of:
                elapsed[row.label] += sum(
                    time_clip(row.read, path_of[row.label], shape, int(starts[i]), int(i)) for i in chunk
                )
    return {label: clips / seconds for label, seconds in elapsed.items()}


def main(args: argparse.Namespace) -> None:
    """Generate the inputs, time every (input format, shape) cell, print one markdown table."""
    torch.set_num_threads(1)  # what DataLoader gives each worker
    clips = 6 if args.quick else args.clips
    with tempfile.TemporaryDirectory(prefix="bench_data_") as root:
        paths = make_inputs(root, args.seed)
        rows = benchmark_rows(paths)
        columns = []
        for shape in SHAPES:
            print(f"measuring {shape.name} ...", file=sys.stderr, flush=True)
            columns.append(measure_shape(rows, shape, clips, args.seed))
    print(
        f"Clips per CPU-second of one process with one thread (a data-loader worker), {clips} clips per cell; "
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, PyAV {av.__version__}, "
        f"video backends {video_io.available_backends()}.\n"
    )
    print("| input | " + " | ".join(shape.name for shape in SHAPES) + " |")
    print("|---|" + "---:|" * len(SHAPES))
    for row in rows:
        cells = [f"{column[row.label]:.1f}" if row.label in column else "–" for column in columns]
        print(f"| {row.label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
