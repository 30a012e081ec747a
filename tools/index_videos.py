"""Write a packet index beside every MP4 video under some folders, so that training reads each clip without a demuxer.

    python tools/index_videos.py /data/k400_256 --workers 16
    python tools/index_videos.py data/demo/kinetics

For each .mp4/.m4v/.mov file found (folders are walked recursively) it writes `<video>.packets`: every packet's offset,
size, timestamps and keyframe flag and the decoder's parameters, about 30 bytes a frame (`video_io.write_packet_index`).
Every loader worker then opens each video with a bare decoder and reads only the packets a clip decodes, from its first
clip of the video on; without the files a worker does so only from its second clip of a video, and only for as many
videos as its memory budget holds. A video changed after it was indexed is recognised (its size and its first and
last packets) and read through the demuxer, with a warning; run the tool again to rewrite its index.
tools/prepare_kinetics.py and tools/make_demo_data.py index the videos they write. Files that cannot be indexed
(packets without offsets or timestamps) are counted; unreadable files are named.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere in the repository

from utils import UserError, run_cli  # noqa: E402
from video_io import VideoReadError, write_packet_index  # noqa: E402

MP4_EXTENSIONS = (".mp4", ".m4v", ".mov")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", type=Path, help="Folders to walk for MP4 videos, or video files.")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="Parallel indexing processes.")
    return p


def find_videos(paths: list[Path]) -> list[str]:
    """The MP4 files among `paths` and under the folders among them, sorted."""
    videos = []
    for path in paths:
        if path.is_dir():
            videos += [os.path.join(folder, name) for folder, _, names in os.walk(path)
                       for name in names if name.lower().endswith(MP4_EXTENSIONS)]
        elif path.is_file():
            videos.append(str(path))
        else:
            raise UserError(f"{path}: no such file or folder")
    return sorted(videos)


def _index_job(path: str) -> tuple[bool, str | None]:
    """(whether an index was written, why the file could not be read)."""
    try:
        return write_packet_index(path), None
    except (VideoReadError, OSError) as error:  # both name the file
        return False, str(error)


def main(args: argparse.Namespace) -> dict[str, int]:
    """Index every video found; prints and returns the counts."""
    videos = find_videos(args.paths)
    counts = {"indexed": 0, "not indexable": 0, "unreadable": 0}
    with multiprocessing.Pool(max(1, min(args.workers, len(videos)))) as pool:
        for written, problem in tqdm(pool.imap_unordered(_index_job, videos, chunksize=16), total=len(videos),
                                     desc="indexing", dynamic_ncols=True):
            if problem is not None:
                counts["unreadable"] += 1
                tqdm.write(f"unreadable: {problem}")
            else:
                counts["indexed" if written else "not indexable"] += 1
    print(f"{len(videos)} videos: {counts['indexed']} indexed, {counts['not indexable']} not indexable (read through "
          f"the demuxer), {counts['unreadable']} unreadable")
    return counts


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser().parse_args()))
