"""Prepare a downloaded Kinetics folder for training: list files, and optionally smaller, faster-to-seek videos.

    python tools/prepare_kinetics.py --root /data/kinetics400 --out /data/k400_256 --short-side 256 --workers 16
    python tools/prepare_kinetics.py --root /data/kinetics400 --out /data/k400_lists       # list files only

Reads the official CSVs (`label,youtube_id,time_start,time_end,split`) from <root>/annotations or <root>, finds the
videos `<youtube_id>_<start:06d>_<end:06d>.<ext>` under <root>/<split>/ or <root>/<split>/<label>/, and writes
<out>/train.csv and <out>/val.csv (`path label` per line, paths relative to <out> when inside it), <out>/labels.txt
(classes sorted alphabetically, line number = class index) and <out>/missing_<split>.txt. `build_kinetics(<out>, ...)`
then reads the list files.

With --short-side the videos are re-encoded with PyAV (H.264, no audio, same frame rate) to that short side under
<out>/<split>/<label>/, with a keyframe every --keyframe-interval frames: decoding a 16-frame clip then touches a
few short GOPs instead of whole seconds of video, encoded for fast decoding (x264's fastdecode tuning,
--no-fast-decode for smaller files), and each gets its packet index beside it (`<video>.packets`,
tools/index_videos.py), so that loader workers read it without a demuxer. The job is resumable: a video whose output
exists and opens is skipped (and indexed if it has no index yet), and outputs are written to a temporary file and
renamed, so an interrupted or failed job never leaves a half file. Packets that fail to decode (a download cut short)
are skipped, as training's reader skips them, rather than failing the video; a video of which no frame decodes is
reported and left out of the list file. A phone video's rotation (display matrix) is kept as metadata, not applied to
the pixels, and video_io turns its frames upright as it does the original's. Without --short-side the original
videos are left as they are; `python tools/index_videos.py <root>` indexes them where they are MP4 files.
"""

import argparse
import multiprocessing
import os
import sys
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kinetics_multigrid import index_videos, read_official_csv  # noqa: E402
from video_io import PACKET_INDEX_SUFFIX, VideoReadError, frame_display_matrix, probe, write_packet_index  # noqa: E402

CSV_NAMES = {"train": ("train.csv",), "val": ("validate.csv", "val.csv")}


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line flags of the tool."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, type=Path,
                   help="The downloaded Kinetics folder: videos under <split>/ or <split>/<label>/.")
    p.add_argument("--out", required=True, type=Path,
                   help="Where the list files (and re-encoded videos) go; pass it to training as --data-root.")
    p.add_argument("--annotations", type=Path, default=None,
                   help="Folder of the official train.csv/validate.csv (default: <root>/annotations, then <root>).")
    p.add_argument("--splits", nargs="+", default=["train", "val"], choices=["train", "val"],
                   help="Splits to prepare.")
    p.add_argument("--short-side", type=int, default=None,
                   help="Re-encode to this short side: 256 for X3D-XS/S/M (test crop 182-256), 320 for L/XL (test "
                        "crop 356 is then upscaled slightly). Without it the list files point at the original videos.")
    p.add_argument("--keyframe-interval", type=int, default=16,
                   help="Frames between keyframes of re-encoded videos; short GOPs make random clip access cheap at "
                        "the cost of larger files.")
    p.add_argument("--crf", type=int, default=23, help="x264 constant rate factor (lower: better and larger).")
    p.add_argument("--fast-decode", action=argparse.BooleanOptionalAction, default=True,
                   help="x264's fastdecode tuning (no CABAC, no deblocking filter): clips decode about twice as fast "
                        "for larger files (benchmarks/README.md). On by default: a CPU loader is often what limits "
                        "training speed.")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="Parallel re-encoding processes (one video each; x264 runs single-threaded in each).")
    return p


# ----------------------------------------------------------------------------------------------------------------------
# Re-encoding
# ----------------------------------------------------------------------------------------------------------------------
def _even(x: float) -> int:
    return max(2, 2 * round(x / 2))


def is_valid_video(path: Path) -> bool:
    """An output counts as done when it opens and reports frames."""
    try:
        return path.is_file() and probe(path).num_frames > 0
    except VideoReadError:
        return False


def reencode(src: str, dst: Path, short_side: int, keyframe_interval: int, crf: int, fast_decode: bool) -> None:
    """Write `src` to `dst` as H.264 at the given short side (never upscaled), via a temporary file; with
    `fast_decode`, x264's fastdecode tuning (no CABAC, no deblocking filter)."""
    tmp = dst.with_name(dst.stem + ".part.mp4")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        # Tags that are not UTF-8 (a Latin-1 title) would fail the open; video_io ignores them too.
        with av.open(src, metadata_errors="ignore") as source, av.open(str(tmp), "w") as target:
            stream = source.streams.video[0]
            stream.codec_context.thread_count = 1  # parallelism comes from --workers processes
            rate = stream.average_rate or stream.guessed_rate or Fraction(30)
            width, height = stream.codec_context.width, stream.codec_context.height
            scale = min(1.0, short_side / min(width, height))
            out = target.add_stream("libx264", rate=rate)
            out.width, out.height, out.pix_fmt = _even(width * scale), _even(height * scale), "yuv420p"
            out.options = {"crf": str(crf), "g": str(keyframe_interval), "preset": "fast",
                           **({"tune": "fastdecode"} if fast_decode else {})}
            out.codec_context.thread_count = 1
            for i, frame in enumerate(_decodable_frames(source, stream)):
                if i == 0:
                    _keep_display_matrix(frame, out)
                frame = frame.reformat(width=out.width, height=out.height, format="yuv420p")
                # Frames renumbered at the average rate: variable-rate sources become constant-rate.
                frame.pts, frame.time_base = i, 1 / Fraction(rate)
                target.mux(out.encode(frame))
            target.mux(out.encode())
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)  # after a failure: tools/index_videos.py would take a half file for a video


def _decodable_frames(container: av.container.InputContainer, stream: av.video.stream.VideoStream
                      ) -> Iterator[av.VideoFrame]:
    """The stream's frames, without those of packets that fail to decode (a download cut short, a corrupt packet),
    as video_io reads them; when no frame decodes, raises the last decoding error."""
    error, count = None, 0
    for packet in container.demux(stream):  # ends with an empty packet, which drains the decoder
        try:
            frames = packet.decode()
        except av.FFmpegError as packet_error:
            error = packet_error
            continue
        count += len(frames)
        yield from frames
    if count == 0:
        raise error or VideoReadError(f"{container.name}: the video stream has no frames")


def _keep_display_matrix(frame: av.VideoFrame, out: av.video.stream.VideoStream) -> None:
    """Give the output the source's display matrix (a phone video's rotation, or a mirroring), if it has one.

    The matrix is kept as metadata rather than applied to the pixels, as in the source: players and video_io turn the
    copy's frames upright as they do the original's."""
    matrix = frame_display_matrix(frame)
    if matrix is not None:
        matrix = list(matrix)
        matrix[6:8] = 0, 0  # a translation, in source pixels: wrong after scaling (FFmpeg's own rotations have none)
        out.set_display_matrix(matrix)


def _reencode_job(job: tuple[str, Path, int, int, int, bool]) -> tuple[Path, str | None]:
    """Worker entry: (output path, None) or (output path, why it failed). Each output gets its packet index."""
    src, dst = job[0], job[1]
    done = is_valid_video(dst)
    try:
        if not done:
            reencode(*job)
        if not done or not os.path.exists(f"{dst}{PACKET_INDEX_SUFFIX}"):
            write_packet_index(dst)
    except (av.FFmpegError, OSError, IndexError, ValueError, VideoReadError) as error:  # IndexError: no video stream
        return dst, f"{src}: {error!r}"
    return dst, None


def reencode_all(jobs: list[tuple[str, Path, int, int, int, bool]], workers: int) -> set[Path]:
    """Re-encode in parallel; returns the outputs that failed (reported on stdout)."""
    failed = set()
    with multiprocessing.Pool(workers) as pool:
        for dst, problem in tqdm(pool.imap_unordered(_reencode_job, jobs, chunksize=4), total=len(jobs),
                                 desc="re-encoding", dynamic_ncols=True):
            if problem is not None:
                failed.add(dst)
                print(f"failed: {problem}")
    return failed


# ----------------------------------------------------------------------------------------------------------------------
# List files
# ----------------------------------------------------------------------------------------------------------------------
def find_csv(args: argparse.Namespace, split: str) -> Path:
    """The official annotation CSV of a split."""
    folders = [args.annotations] if args.annotations else [args.root / "annotations", args.root]
    for folder in folders:
        for name in CSV_NAMES[split]:
            if (folder / name).is_file():
                return folder / name
    raise FileNotFoundError(f"no official {split} CSV ({'/'.join(CSV_NAMES[split])}) in {', '.join(map(str, folders))}")


def _list_path(path: Path, out: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(out.resolve())) if path.is_relative_to(out.resolve()) else str(path)


def prepare_split(args: argparse.Namespace, split: str, classes: list[str]) -> None:
    """Find (and re-encode) a split's videos, then write its list file and its missing-video report."""
    csv_path = find_csv(args, split)
    rows = read_official_csv(csv_path)
    found = index_videos(args.root, split, {name for _, name in rows})
    missing = [name for _, name in rows if name not in found]
    (args.out / f"missing_{split}.txt").write_text("".join(f"{name}\n" for name in missing))
    print(f"{split}: {len(rows) - len(missing)} videos found, {len(missing)} of {len(rows)} missing "
          f"(listed in {args.out / f'missing_{split}.txt'})")
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({label for label, _ in rows if label not in index})
    if unknown:
        raise ValueError(f"{csv_path}: labels not in the train CSV: {unknown[:5]}")
    entries = [(Path(found[name]), index[label]) for label, name in rows if name in found]
    if args.short_side:
        # Label folders without spaces keep the list files readable by space-separated parsers (PySlowFast).
        targets = [args.out / split / label.replace(" ", "_") / f"{name}.mp4" for label, name in rows if name in found]
        jobs = [(str(src), dst, args.short_side, args.keyframe_interval, args.crf, args.fast_decode)
                for (src, _), dst in zip(entries, targets)]
        failed = reencode_all(jobs, args.workers)
        entries = [(dst, label) for (_, label), dst in zip(entries, targets) if dst not in failed]
    list_file = args.out / f"{split}.csv"
    list_file.write_text("".join(f"{_list_path(path, args.out)} {label}\n" for path, label in entries))
    print(f"{split}: wrote {len(entries)} videos to {list_file}")


def main(args: argparse.Namespace) -> None:
    """Write labels.txt, then each split's list file (re-encoding its videos first when asked)."""
    args.out.mkdir(parents=True, exist_ok=True)
    for split in args.splits:
        list_file = args.out / f"{split}.csv"
        if list_file.is_file() and "youtube_id" in list_file.read_text()[:200]:
            raise FileExistsError(f"{list_file} is an official annotation CSV; choose another --out")
    classes = sorted({label for label, _ in read_official_csv(find_csv(args, "train"))})
    (args.out / "labels.txt").write_text("".join(f"{c}\n" for c in classes))
    for split in args.splits:
        prepare_split(args, split, classes)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
