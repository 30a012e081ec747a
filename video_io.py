"""Decoding: video files and JPEG frame folders into uint8 RGB clips of shape (T, C, H, W).

Inputs
- video files (.mp4/.webm/.mkv/.avi/...) through PyAV (its wheels carry FFmpeg) or torchcodec (needs the system's
  FFmpeg shared libraries, libavcodec & co.);
- folders of JPEG frames: the original repo's `frame_00001.jpg` and Charades' `<id>-000001.jpg` (any name that ends
  in a frame number), decoded with Pillow's libjpeg-turbo. When the caller needs a short side at most half the
  frame's, they decode at 1/2, 1/4 or 1/8 size (DCT scaling). A folder's frames are its files of the naming pattern
  most of them share (a stray `cover_2.jpg` is not a frame), and frame i is the one numbered i after the lowest:
  per-frame labels (Charades) count frames by their numbers. A number missing from the folder is read as the frame
  before it, with a warning naming the folder and how many numbers are missing (once per folder and process).

torchcodec reads MP4/MOV and Matroska/WebM files (known by their first bytes); the PyAV reader takes the others (in
an MPEG-TS file with B-frames, torchcodec returns other frames than those asked for, without an error).

How PyAV reads sparse frames: the packets are demuxed first (no decoding), which gives the exact frame count, every
frame's timestamp and the keyframes. Then only the GOPs that hold a requested frame are decoded, jumping over the
others, and frames no other frame refers to are skipped unless requested (where the decoder allows it per frame:
H.264, HEVC, MPEG-2/4, VP8/9). This beats one decoding pass, a seek per frame, and torchcodec, which jumps over GOPs
too but decodes every frame inside them, at every clip shape measured (benchmarks/README.md, bench_data.py), so
"auto" is PyAV. A process keeps what the demuxer found in an MP4 (`_PacketIndex`: the packets' offsets, sizes,
timestamps and keyframes, the decoder's parameters and the display matrix, which a bare decoder does not see, about
30 bytes a packet, up to `PACKET_INDEX_BUDGET` packets), and reads the file again without a demuxer: a bare decoder
and just the packets it decodes (`_IndexedVideo`). The training loader's workers last for the whole run, so this
pays from a worker's second clip of a video. An index
written beside the video (`write_packet_index`, `<video>.packets`; tools/index_videos.py, prepare_kinetics.py and
make_demo_data.py write them) serves every process from its first clip of the video on.

`open_video` opens a file or folder once for its `info` and its frames: a training clip needs the length before it
can choose its frames, and a second open would parse the header (and, for PyAV, probe the stream) again.

Frames come out as a player shows them: a container's display matrix (a phone video's rotation, or a mirroring; MP4/MOV
and Matroska carry one) is applied, and `VideoInfo` gives the height and width after it. torchcodec turns frames by
quarter turns only, so MP4/MOV files whose matrix mirrors go to the PyAV reader (a mirroring Matroska file, rare, and
known only from a decoded frame, is read by torchcodec as a half turn). A video's fps is its average frame rate as
FFmpeg derives it from the header (PyAV's `average_rate`) with either backend: torchcodec reports the rate of the
timestamps instead, the same for a constant-rate video only, so where it is not the frames' average rate (a
variable-rate video) the info comes from PyAV.

Frame indices count the frames a player shows, in presentation order from 0: an MP4 cut without re-encoding keeps
the packets from the keyframe before the cut, and its edit list marks those before the cut as not shown; they are
not counted. Out-of-range indices are clamped. A frame whose packet does not decode is replaced by the nearest
earlier frame decoded. An MP4 that holds fewer frames than its header promises (a download cut short after its
header) raises `VideoReadError` for frames past its end, naming the path and how many of the promised frames it
holds, so that the datasets count it as a failed video and take another. Anything that cannot give a single frame
raises `VideoReadError` naming the path and the problem.
"""

import base64
import bisect
import contextlib
import functools
import json
import logging
import os
import re
import struct
import sys
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from fractions import Fraction
from typing import NamedTuple

import av
import numpy as np
import torch
from PIL import Image

BACKENDS = ("auto", "pyav", "torchcodec")
# FFmpeg decoders that check `skip_frame` for every frame, so it can change from one packet to the next. Others
# read it once when they open (libdav1d for AV1): asking them to skip would drop shown frames for the whole read.
_PER_FRAME_SKIP_DECODERS = frozenset({"h264", "hevc", "mpeg1video", "mpeg2video", "mpeg4", "vp8", "vp9"})
_FRAME_FILE = re.compile(r"(\d+)\.jpe?g$", re.IGNORECASE)

PathLike = str | os.PathLike
log = logging.getLogger(__name__)


class VideoReadError(Exception):
    """A video file or frame folder is missing, truncated or cannot be decoded; the message names the path."""


class VideoInfo(NamedTuple):
    """Length, frame rate and frame size of a video file or frame folder."""

    num_frames: int
    fps: float
    height: int
    width: int


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------


def available_backends() -> list[str]:
    """Video-file backends usable on this machine ("pyav" always; "torchcodec" when it imports and finds FFmpeg)."""
    return ["pyav", "torchcodec"] if _torchcodec_problem() is None else ["pyav"]


def open_video(path: PathLike, backend: str = "auto", *, fps: float = 30.0) -> "Video":
    """Open a video file or JPEG frame folder once for its `info` and any number of `read`s (a context manager).

    A training clip needs the length and frame rate before it can choose its frames; one open serves both, where
    `probe` then `read_frames` would open the file and parse its header twice. `fps` is used for folders only;
    `backend` ("auto", "pyav", "torchcodec") applies to video files.
    """
    path = os.fspath(path)
    _check_backend_name(backend)
    if os.path.isdir(path):
        return _FrameFolder(path, fps)
    status = _check_file(path)
    if _resolve_backend(backend) == "torchcodec" and _torchcodec_reads(path):
        return _TorchcodecVideo(path)
    version = (status.st_size, status.st_mtime_ns)  # a file changed on disk is read afresh
    index = _packet_indexes.get(path)
    if index is None or index.version != version:
        index = _load_packet_index(path, version)
    return _IndexedVideo(path, index) if index is not None else _PyAVVideo(path, version)


def probe(path: PathLike, backend: str = "auto", *, fps: float = 30.0) -> VideoInfo:
    """Frame count, fps and frame size of a video file or JPEG frame folder (`fps` is used for folders only)."""
    with open_video(path, backend, fps=fps) as video:
        return video.info


def read_frames(
    path: PathLike, indices: Sequence[int], *, backend: str = "auto", min_short_side: int | None = None
) -> torch.Tensor:
    """Frames at `indices` of a video file or JPEG frame folder: `Video.read` of `open_video(path, backend)`."""
    with open_video(path, backend) as video:
        return video.read(indices, min_short_side=min_short_side)


class Video:
    """An open video file or frame folder; `open_video` makes one. Close it, or use it in a `with` block."""

    path: str

    @functools.cached_property
    def info(self) -> VideoInfo:
        """Frame count, fps and frame size."""
        return self._info()

    def read(self, indices: Sequence[int], *, min_short_side: int | None = None) -> torch.Tensor:
        """Frames at `indices` (order kept, repeats allowed, out-of-range clamped) as uint8 RGB (T, C, H, W).

        The tensor is a (T, C, H, W) view of channels-last memory, the layout the uint8 resize in transforms.py is
        fastest on; call .contiguous() before .view() if a dense (T, C, H, W) tensor is needed.
        `min_short_side` lets a JPEG folder decode at a reduced size whose short side stays >= it; video files always
        decode at full size.
        """
        indices = [int(i) for i in indices]
        if not indices:
            raise ValueError(f"{self.path}: no frame indices requested")
        return self._read(indices, min_short_side)

    def close(self) -> None:
        pass

    def __enter__(self) -> "Video":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _info(self) -> VideoInfo:
        raise NotImplementedError

    def _read(self, indices: list[int], min_short_side: int | None) -> torch.Tensor:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------------------------
# Helpers shared by the backends
# ----------------------------------------------------------------------------------------------------------------


def _check_backend_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; choose one of {BACKENDS}")


def _resolve_backend(backend: str) -> str:
    if backend == "torchcodec":
        problem = _torchcodec_problem()
        if problem is not None:
            raise RuntimeError(f"the torchcodec backend is not usable here: {problem}")
    # "auto" is PyAV: it reads the sparse clips of training and testing faster (module docstring).
    return "torchcodec" if backend == "torchcodec" else "pyav"


def _check_file(path: str) -> os.stat_result:
    try:
        status = os.stat(path)
    except FileNotFoundError as error:
        raise VideoReadError(f"{path}: no such file or folder") from error
    except OSError as error:
        raise VideoReadError(f"{path}: cannot be read ({error.strerror})") from error
    if status.st_size == 0:
        raise VideoReadError(f"{path}: file is empty")
    return status


def _clamp(indices: list[int], num_frames: int) -> list[int]:
    return [min(max(i, 0), num_frames - 1) for i in indices]


def _stack_hwc(path: str, frames: list[np.ndarray], orientation: "_Orientation | None" = None) -> torch.Tensor:
    """(H, W, C) arrays, turned upright as `orientation` says, -> uint8 (T, C, H, W); the memory stays channels-last,
    which resizes fastest."""
    if orientation is not None:
        frames = [_upright(f, orientation) for f in frames]  # views: np.stack makes the one copy
    shapes = {f.shape for f in frames}
    if len(shapes) > 1:
        raise VideoReadError(f"{path}: frames have different sizes {sorted(shapes)}")
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)  # (T, H, W, C) -> (T, C, H, W)


# ----------------------------------------------------------------------------------------------------------------
# Display matrix: how a decoded frame is turned to be shown upright
# ----------------------------------------------------------------------------------------------------------------

_MATROSKA_DEMUXER = "matroska,webm"
_IDENTITY_MATRIX = (1 << 16, 0, 0, 0, 1 << 16, 0, 0, 0, 1 << 30)  # 16.16 fixed point, but 2.30 in the last column


class _Orientation(NamedTuple):
    """How to turn a decoded (H, W, C) frame upright: swap its rows and columns, then reverse its rows, its columns."""

    transpose: bool
    flip_rows: bool
    flip_cols: bool


def _orientation(matrix: Sequence[int] | None) -> _Orientation | None:
    """The turn a display matrix asks for (FFmpeg's layout: [a b u; c d v; x y w] row by row), rounded to a quarter
    turn, with its mirroring; None where the frame is shown as decoded.

    The matrix shows a source pixel (x, y) at (a x + c y, b x + d y): rows and columns swap where b and c outweigh a
    and d, and a negative factor reverses the rows or the columns it gives. This is how FFmpeg's command line turns
    frames (transpose, hflip, vflip). Scaling (non-square pixels) and translation do not turn a frame.
    """
    if matrix is None:
        return None
    a, b, _, c, d = matrix[:5]
    transpose = abs(b) + abs(c) > abs(a) + abs(d)
    rows, cols = (b, c) if transpose else (d, a)
    return _Orientation(transpose, rows < 0, cols < 0) if transpose or rows < 0 or cols < 0 else None


def _upright(frame: np.ndarray, orientation: _Orientation) -> np.ndarray:
    """An (H, W, C) frame turned as `orientation` says (a view of it)."""
    if orientation.transpose:
        frame = frame.transpose(1, 0, 2)
    if orientation.flip_rows:
        frame = frame[::-1]
    if orientation.flip_cols:
        frame = frame[:, ::-1]
    return frame


def _mp4_display_matrix(path: str) -> tuple[int, ...] | None:
    """The display matrix FFmpeg's MP4/MOV demuxer gives the file's first video track, read from its header; None
    where there is none (or the header does not parse, which fails the demuxer too).

    PyAV gives a stream's display matrix only with the frames it decodes, and a bare decoder's frames lack it, so it is
    read here: FFmpeg multiplies the track header's (tkhd) matrix by the movie header's (mvhd) and keeps the product
    unless it is the identity. The header is in the page cache after the demuxer's read; this reads a few of its boxes.
    """
    try:
        with open(path, "rb") as file:
            fd, offset, file_size = file.fileno(), 0, os.fstat(file.fileno()).st_size
            while offset + 8 <= file_size:  # the top-level boxes: ftyp, mdat, moov, ... in any order
                kind, payload, end = _box_header(os.pread(fd, 16, offset), 0, file_size - offset)
                if kind == b"moov":
                    moov = os.pread(fd, end - payload, offset + payload)
                    break
                offset += end
            else:
                return None
        movie = _IDENTITY_MATRIX
        for kind, start, end in _boxes(moov, 0, len(moov)):
            if kind == b"mvhd":  # its matrix follows 36 bytes of times and settings (48 in version 1)
                movie = struct.unpack_from(">9i", moov, start + (48 if moov[start] == 1 else 36))
            elif kind == b"trak":
                track, video = _IDENTITY_MATRIX, False
                for child, child_start, child_end in _boxes(moov, start, end):
                    if child == b"tkhd":  # its matrix follows 40 bytes (52 in version 1)
                        track = struct.unpack_from(">9i", moov, child_start + (52 if moov[child_start] == 1 else 40))
                    elif child == b"mdia":  # the media handler says what the track holds
                        video |= any(k == b"hdlr" and moov[s + 8:s + 12] in (b"vide", b"auxv")
                                     for k, s, _ in _boxes(moov, child_start, child_end))
                if video:
                    shifts = (16, 16, 30)  # fixed-point products, as FFmpeg rounds them
                    matrix = tuple(sum(track[3 * i + e] * movie[3 * e + j] >> shifts[e] for e in range(3))
                                   for i in range(3) for j in range(3))
                    return None if matrix == _IDENTITY_MATRIX else matrix
    except (OSError, struct.error, ValueError, IndexError):
        pass
    return None


def _box_header(data: bytes, at: int, end: int) -> tuple[bytes, int, int]:
    """(type, where its payload starts, where it ends) of the ISO-BMFF box at data[at:], which may reach to `end`."""
    size, kind = struct.unpack_from(">I4s", data, at)
    header = 8
    if size == 1:  # a 64-bit size follows the type
        size, header = struct.unpack_from(">Q", data, at + 8)[0], 16
    elif size == 0:  # the box reaches to the end
        size = end - at
    if size < header:
        raise ValueError(f"a box of {size} bytes")
    return kind, at + header, at + size


def _boxes(data: bytes, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """(type, payload start, end) of each box in data[start:end]."""
    while start + 8 <= end:
        kind, payload, box_end = _box_header(data, start, end)
        yield kind, payload, min(box_end, end)
        start = box_end


def frame_display_matrix(frame: av.VideoFrame) -> tuple[int, ...] | None:
    """A decoded frame's display matrix (FFmpeg's layout, [a b u; c d v; x y w] row by row), or None."""
    side_data = frame.side_data.get(av.sidedata.sidedata.Type.DISPLAYMATRIX)
    return struct.unpack("=9i", bytes(side_data)) if side_data is not None else None  # native-endian int32s


# ----------------------------------------------------------------------------------------------------------------
# PyAV
# ----------------------------------------------------------------------------------------------------------------


def _open_video_stream(container: av.container.InputContainer, path: str) -> av.video.stream.VideoStream:
    if not container.streams.video:
        raise VideoReadError(f"{path}: no video stream")
    stream = container.streams.video[0]
    # Data-loader workers already use one core each; decoder threads would only oversubscribe them.
    stream.codec_context.thread_count = 1
    return stream


def _av_open(path: str) -> av.container.InputContainer:
    try:
        return av.open(path, metadata_errors="ignore")
    except (av.FFmpegError, OSError) as error:
        raise VideoReadError(f"{path}: cannot open as a video ({error})") from error


class _PyAVVideo(Video):
    def __init__(self, path: str, version: tuple[int, int] | None = None) -> None:
        self.path = path
        self.version = version  # the file's size and modification time, or None not to index it
        self.container = _av_open(path)
        try:
            self.stream = _open_video_stream(self.container, path)
        except VideoReadError:
            self.container.close()
            raise
        self._packets: list[av.Packet] | None = None

    def close(self) -> None:
        self.container.close()

    def _info(self) -> VideoInfo:
        rate = self.stream.average_rate or self.stream.guessed_rate
        if not rate:
            raise VideoReadError(f"{self.path}: the video stream has no frame rate")
        num_frames = self.num_frames
        if num_frames == 0:
            raise VideoReadError(f"{self.path}: the video stream has no frames")
        codec = self.stream.codec_context
        orientation = _orientation(self.display_matrix)
        if orientation is not None and orientation.transpose:  # shown a quarter turn from how it is stored
            return VideoInfo(num_frames, float(rate), codec.width, codec.height)
        return VideoInfo(num_frames, float(rate), codec.height, codec.width)

    @functools.cached_property
    def display_matrix(self) -> tuple[int, ...] | None:
        """The stream's display matrix, or None.

        An MP4/MOV file's is read from its header (`_mp4_display_matrix`). PyAV gives a Matroska file's only with a
        decoded frame, so its first frame is decoded for it; the other containers carry none.
        """
        name = self.container.format.name
        if name == _MP4_DEMUXER:
            return _mp4_display_matrix(self.path)
        if name != _MATROSKA_DEMUXER:
            return None
        codec = self.stream.codec_context
        codec.flush_buffers()
        for packet in [*self.packets(), None]:
            frames = _decode_packet(codec, packet)
            if frames:
                codec.flush_buffers()
                return frame_display_matrix(frames[0])
        return None

    @functools.cached_property
    def num_frames(self) -> int:
        """The frames the video shows: its packets not marked discard, or as many as an MP4 header promises.

        An MP4 header counts the frames its edit list trims off too; less those, its count is what the file should
        hold, more than the packets demuxed when the file was cut short. Other containers' counts are not used: an AVI
        header's counts the empty chunks of dropped frames, which are no packets; webm/mkv headers have none.
        """
        packets = self.packets()
        shown = sum(not p.is_discard for p in packets)
        if self.container.format.name != _MP4_DEMUXER:
            return shown
        return max(shown, self.stream.frames - (len(packets) - shown))

    def packets(self) -> list[av.Packet]:
        """All packets of the stream in decode order (demuxed once); a read error ends the list."""
        if self._packets is None:
            self._packets = []
            try:
                for packet in self.container.demux(self.stream):
                    if packet.size > 0:  # the demuxer ends with an empty flush packet
                        self._packets.append(packet)
            except av.FFmpegError:
                pass
        return self._packets

    def _read(self, indices: list[int], min_short_side: int | None) -> torch.Tensor:
        packets = self.packets()
        if not packets:
            raise VideoReadError(f"{self.path}: no video packets (empty or truncated file)")
        codec = self.stream.codec_context
        codec.flush_buffers()  # a read before this one left its frames in the decoder
        codec.skip_frame = "DEFAULT"
        timestamps = [p.pts for p in packets if not p.is_discard]
        if None in timestamps or len(set(timestamps)) != len(timestamps):
            indices = [max(i, 0) for i in indices]
            decoded = _decode_in_order(codec, packets, sorted(set(indices)))
        else:
            num_frames = self.num_frames
            indices = _clamp(indices, num_frames)
            _check_within_file(self.path, indices, len(timestamps), num_frames)
            keyframes = [i for i, p in enumerate(packets) if p.is_keyframe]
            decoded = _decode_indexed(codec, [p.pts for p in packets], keyframes, packets.__getitem__,
                                      sorted(timestamps), sorted(set(indices)))
            if decoded and self.version is not None:
                _remember_packets(self)
                self.version = None  # once per open
        if len(decoded) < len(set(indices)):  # nothing decoded at or around a requested frame
            raise VideoReadError(f"{self.path}: no frame could be decoded")
        return _stack_hwc(self.path, [decoded[i] for i in indices], _orientation(self.display_matrix))


def _check_within_file(path: str, indices: list[int], held: int, promised: int) -> None:
    """Raise `VideoReadError` where `indices` reach past the `held` frames of a file whose header promises more: the
    file was cut short, and its clips would repeat its last frame; the datasets count such a video and take another."""
    if max(indices) >= held:
        raise VideoReadError(f"{path}: the file ends early: it holds {held} of the {promised} frames its header "
                             f"promises (cut short after its header?), and frame {max(indices)} was asked for")


# A process keeps the packet index of each MP4/MOV file it has read, up to this many packets in all (29 bytes each:
# the demo's 2,000 videos take 180,000; Kinetics-400's 240,000 training videos, about 70 times the budget).
PACKET_INDEX_BUDGET = 1_000_000
_MP4_DEMUXER = "mov,mp4,m4a,3gp,3g2,mj2"
_PACKET_FIELDS = np.dtype([("pos", "<i8"), ("size", "<i4"), ("pts", "<i8"), ("dts", "<i8"), ("keyframe", "?")])
# What a bare decoder needs besides the bitstream to give the pixels the file's own decoder gives.
_DECODER_PARAMETERS = ("extradata", "codec_tag", "width", "height", "pix_fmt", "color_range", "colorspace",
                       "color_primaries", "color_trc")


class _PacketIndex(NamedTuple):
    version: tuple[int, int]  # the file's size and modification time (ns) when it was indexed
    info: VideoInfo
    codec_name: str
    parameters: dict
    time_base: Fraction
    packets: np.ndarray  # _PACKET_FIELDS, one row per packet in decode order
    display_matrix: tuple[int, ...] | None  # the container's, which the bare decoder's frames lack


_packet_indexes: dict[str, _PacketIndex] = {}  # by path
_indexed_packets = 0  # in _packet_indexes, counted against the budget


def _index_packets(video: _PyAVVideo) -> _PacketIndex | None:
    """`video`'s packet index, or None where its packets cannot be read without the demuxer.

    Only MP4/MOV files, whose demuxer hands a video packet over as the bytes stored at its offset (checked here on the
    first and last packet), and only streams whose packets all have offsets and timestamps, none discarded or with
    side data.
    """
    packets = video.packets()
    if video.container.format.name != _MP4_DEMUXER or not packets:
        return None
    if any(p.pos < 0 or p.pts is None or p.dts is None or p.is_discard or any(True for _ in p.iter_sidedata())
           for p in packets):
        return None
    table = np.array([(p.pos, p.size, p.pts, p.dts, p.is_keyframe) for p in packets], dtype=_PACKET_FIELDS)
    if _end_packets(video.path, table) != [bytes(packets[0]), bytes(packets[-1])]:
        return None
    codec = video.stream.codec_context
    parameters = {name: getattr(codec, name) for name in _DECODER_PARAMETERS}
    return _PacketIndex(video.version, video.info, codec.name, parameters, video.stream.time_base, table,
                        video.display_matrix)


def _end_packets(path: str, table: np.ndarray) -> list[bytes]:
    """The bytes the index places at its first and last packet."""
    with open(path, "rb") as file:
        return [os.pread(file.fileno(), int(table["size"][row]), int(table["pos"][row])) for row in (0, -1)]


def _remember_packets(video: _PyAVVideo) -> None:
    """Keep `video`'s packet index for the process's later reads of the file, where it qualifies (`_index_packets`).

    Nothing is evicted: once the budget is spent, later files are read through the demuxer as before.
    """
    _forget_packet_index(video.path)  # the file has changed since it was indexed, or its index did not decode
    if _indexed_packets + len(video.packets()) <= PACKET_INDEX_BUDGET:  # before the work of making the index
        _keep(video.path, _index_packets(video))


def _keep(path: str, index: _PacketIndex | None) -> None:
    """Keep `index` as `path`'s, in place of one kept before (which no longer matches the file), within the budget."""
    global _indexed_packets
    _forget_packet_index(path)
    if index is not None and _indexed_packets + len(index.packets) <= PACKET_INDEX_BUDGET:
        _packet_indexes[path] = index
        _indexed_packets += len(index.packets)


def _forget_packet_index(path: str) -> None:
    global _indexed_packets
    stale = _packet_indexes.pop(path, None)
    if stale is not None:
        _indexed_packets -= len(stale.packets)


# A packet index written beside its video (`write_packet_index`) serves every process's first read of the file: an
# ASCII magic line, one JSON line (the video's size and the CRC-32 of its first and last packet, to tell a changed
# file; VideoInfo; the decoder's name and parameters; the time base; the packet count; the display matrix), then the
# packet table. Format 1 had no display matrix: such a file is right for a video without one, and is used for it.
PACKET_INDEX_SUFFIX = ".packets"
_INDEX_MAGIC = b"X3D packet index 2\n"
_INDEX_MAGIC_1 = b"X3D packet index 1\n"
_warned_about_index_files = False


def write_packet_index(path: PathLike) -> bool:
    """Write the packet index of the MP4 file `path` beside it (`<path>.packets`), atomically.

    Any process then reads the file without a demuxer from its first clip on, where the index a process makes itself
    (`_remember_packets`) serves only its later reads, and only within its budget. Returns False, and removes an
    older index file, where the video does not qualify (`_index_packets`: not MP4/MOV, packets without offsets or
    timestamps). Raises `VideoReadError` for a file that cannot be read as a video.
    """
    path = os.fspath(path)
    status = _check_file(path)
    with _PyAVVideo(path, (status.st_size, status.st_mtime_ns)) as video:
        video.info  # noqa: B018 (raises for a file without a video stream or frames)
        index = _index_packets(video)
        # the bytes stored at the first and last packet: _index_packets checked that the demuxer hands them over as is
        end_crc32 = [zlib.crc32(bytes(video.packets()[row])) for row in (0, -1)] if index is not None else None
    target = path + PACKET_INDEX_SUFFIX
    if index is None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(target)
        return False
    parameters = dict(index.parameters)
    if parameters["extradata"] is not None:
        parameters["extradata"] = base64.b64encode(parameters["extradata"]).decode("ascii")
    header = {"video_bytes": index.version[0], "end_crc32": end_crc32, "info": list(index.info),
              "codec": index.codec_name, "parameters": parameters,
              "time_base": [index.time_base.numerator, index.time_base.denominator], "packets": len(index.packets),
              "display_matrix": index.display_matrix}
    temporary = f"{target}.{os.getpid()}.tmp"
    with open(temporary, "wb") as file:
        file.write(_INDEX_MAGIC + json.dumps(header).encode("ascii") + b"\n" + index.packets.tobytes())
    os.replace(temporary, target)
    return True


def _load_packet_index(path: str, version: tuple[int, int]) -> _PacketIndex | None:
    """The index written beside `path`, kept within the budget; None where there is none or it does not match."""
    index_file = path + PACKET_INDEX_SUFFIX
    try:
        with open(index_file, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        return None
    except OSError as error:
        return _ignore_index_file(index_file, f"cannot be read ({error.strerror})")
    try:
        magic = data[:len(_INDEX_MAGIC)]
        if magic not in (_INDEX_MAGIC, _INDEX_MAGIC_1):
            raise ValueError("no packet index header")
        end = data.index(b"\n", len(_INDEX_MAGIC))
        header = json.loads(data[len(_INDEX_MAGIC):end])
        table = np.frombuffer(data, dtype=_PACKET_FIELDS, count=header["packets"], offset=end + 1)
        if end + 1 + table.nbytes != len(data) or not len(table):
            raise ValueError(f"{len(data) - end - 1} bytes of packets for {header['packets']} packets")
        parameters = {name: header["parameters"][name] for name in _DECODER_PARAMETERS}
        if parameters["extradata"] is not None:
            parameters["extradata"] = base64.b64decode(parameters["extradata"])
        num_frames, fps, height, width = header["info"]
        if magic == _INDEX_MAGIC:
            matrix = header["display_matrix"]
            if matrix is not None:
                matrix = tuple(int(value) for value in matrix)
                if len(matrix) != 9:
                    raise ValueError(f"a display matrix of {len(matrix)} numbers")
        elif (matrix := _mp4_display_matrix(path)) is not None:  # format 1 read its frames and size unturned
            return _ignore_index_file(index_file, "was written without the video's display matrix (an older format)")
        index = _PacketIndex(version, VideoInfo(int(num_frames), float(fps), int(height), int(width)),
                             str(header["codec"]), parameters, Fraction(*header["time_base"]), table, matrix)
        if header["video_bytes"] != version[0] or header["end_crc32"] != [
                zlib.crc32(b) for b in _end_packets(path, table)]:
            return _ignore_index_file(index_file, "does not match its video (the video changed after it was indexed)")
    except (ValueError, KeyError, TypeError, ZeroDivisionError, OSError) as error:  # JSONDecodeError is a ValueError
        return _ignore_index_file(index_file, f"is not a readable packet index ({error})")
    _keep(path, index)
    return index


def _ignore_index_file(index_file: str, problem: str) -> None:
    """Report the first unusable index file of the process; its video is read through the demuxer."""
    global _warned_about_index_files
    if not _warned_about_index_files:
        _warned_about_index_files = True
        warnings.warn(f"{index_file} {problem}; reading the video through its demuxer instead (further such files "
                      f"are not reported; `python tools/index_videos.py <folder>` writes them again)", stacklevel=4)


class _IndexedVideo(Video):
    """An MP4 file this process has read before, decoded from its packet index without opening a demuxer.

    Opening a file with FFmpeg probes its streams (decoding a little to learn their format) and demuxing reads every
    packet's header: a fixed cost per clip, a large part of a short clip of a small video (the demo's coarse
    multigrid shapes; benchmarks/README.md), a small one of a Kinetics clip. A file read once leaves its index
    (`_remember_packets`: each packet's offset, size, timestamps and keyframe flag, the decoder's parameters and the
    display matrix), so a later read opens a bare decoder and reads from the file just the packets it decodes. The
    index can also come from a file beside the video (`write_packet_index`), for a process's first read.
    Should the index not decode, it is dropped and the file is read through the demuxer.
    """

    def __init__(self, path: str, index: _PacketIndex) -> None:
        self.path = path
        self.index = index

    def _info(self) -> VideoInfo:
        return self.index.info

    def _read(self, indices: list[int], min_short_side: int | None) -> torch.Tensor:
        index = self.index
        pos, size, pts, dts, keyframe = (index.packets[field].tolist() for field in _PACKET_FIELDS.names)
        indices = _clamp(indices, index.info.num_frames)
        _check_within_file(self.path, indices, len(pts), index.info.num_frames)  # none discarded (_index_packets)
        orientation = _orientation(index.display_matrix)
        try:
            codec = av.CodecContext.create(index.codec_name, "r")
            for name, value in index.parameters.items():
                setattr(codec, name, value)
            codec.thread_count = 1
            with open(self.path, "rb") as file:

                def packet_at(i: int) -> av.Packet:
                    file.seek(pos[i])
                    packet = av.Packet(file.read(size[i]))
                    packet.pts, packet.dts, packet.is_keyframe = pts[i], dts[i], keyframe[i]
                    packet.time_base = index.time_base
                    return packet

                keyframes = [i for i, key in enumerate(keyframe) if key]
                decoded = _decode_indexed(codec, pts, keyframes, packet_at, sorted(pts), sorted(set(indices)))
        except (av.FFmpegError, OSError, ValueError, TypeError):
            decoded = {}
        if len(decoded) < len(set(indices)):  # the file no longer matches its index: read it through the demuxer
            with _PyAVVideo(self.path, index.version) as video:  # which drops the index, or makes a new one
                return video.read(indices, min_short_side=min_short_side)
        return _stack_hwc(self.path, [decoded[i] for i in indices], orientation)


def _decode_packet(codec: av.CodecContext, packet: av.Packet | None) -> list[av.VideoFrame]:
    """Decode one packet (None drains the decoder); a corrupt packet yields no frame instead of failing the read."""
    try:
        return codec.decode(packet)
    except av.FFmpegError:
        return []


def _rgb(frame: av.VideoFrame) -> np.ndarray:
    # One swscale thread: PyAV's default (0, automatic) starts a thread pool for every frame it converts, which costs
    # more than the conversion of a small frame (benchmarks/README.md); the pixels are the same.
    return frame.to_ndarray(format="rgb24", threads=1)  # (H, W, 3)


def _gop_start(pts: list[int | None], keyframes: list[int], position: int, shown_at: int) -> int:
    """Decode position of the last keyframe before `position` that a frame shown at `shown_at` can be decoded from."""
    k = bisect.bisect_right(keyframes, position) - 1
    # An open-GOP keyframe shows after the frames that lead it, so those start from an earlier keyframe.
    while k > 0 and pts[keyframes[k]] > shown_at:
        k -= 1
    return keyframes[k] if k >= 0 else 0


def _decode_indexed(
    codec: av.CodecContext,
    pts: list[int | None],
    keyframes: list[int],
    packet_at: Callable[[int], av.Packet],
    timestamps: list[int],
    targets: list[int],
) -> dict[int, np.ndarray]:
    """Decode frames `targets` (sorted, unique presentation indices), skipping GOPs and frames not needed.

    `pts` and `keyframes` describe the stream's packets in decode order (their timestamps, the positions of the
    keyframes), `packet_at(i)` gives packet i, and `timestamps` are the shown frames' timestamps, sorted.
    A decoder gives its frames in presentation order (one that comes too late is dropped), so a target that has not
    come out once a later frame does, or once the stream ends, never will (its packet is corrupt): the nearest earlier
    frame the decoder gave stands in for it, or, where decoding started after that frame, the later one. A target
    is left out only where no frame decoded around it.
    """
    wanted = {timestamps[t]: t for t in targets}
    position_of = {p: i for i, p in enumerate(pts)}
    skip_unwanted = codec.name in _PER_FRAME_SKIP_DECODERS
    decoded: dict[int, np.ndarray] = {}
    previous = None  # the frame the decoder gave last since it started at a keyframe
    done = 0  # targets[:done] are decoded or stood in for
    position = 0  # next packet to send, in decode order; len(pts) sends the drain
    for t in targets:
        if t in decoded:
            continue
        start = _gop_start(pts, keyframes, position_of[timestamps[t]], timestamps[t])
        if start > position:  # the target's GOP lies ahead: drop the decoder's state and jump to it
            codec.flush_buffers()
            position, previous = start, None
        while t not in decoded and position <= len(pts):
            packet = packet_at(position) if position < len(pts) else None
            if skip_unwanted:  # frames no other frame refers to are decoded only when asked for
                codec.skip_frame = "DEFAULT" if packet is None or packet.pts in wanted else "NONREF"
            for frame in _decode_packet(codec, packet):
                if frame.pts in wanted:
                    decoded[wanted[frame.pts]] = _rgb(frame)
                # Targets shown before this frame that did not come out will not.
                while done < len(targets) and timestamps[targets[done]] <= frame.pts:
                    if targets[done] not in decoded:
                        decoded[targets[done]] = _rgb(previous if previous is not None else frame)
                    done += 1
                previous = frame
            position += 1
        if t not in decoded and previous is not None:  # the stream ended before it: the frame decoded last
            decoded[t] = _rgb(previous)
    return decoded


def _decode_in_order(codec: av.CodecContext, packets: list[av.Packet], targets: list[int]) -> dict[int, np.ndarray]:
    """Fallback for streams without usable timestamps: count frames as they come out, up to the last target."""
    wanted = set(targets)
    decoded: dict[int, np.ndarray] = {}
    count, last = 0, None
    for packet in [*packets, None]:
        for frame in _decode_packet(codec, packet):
            if count in wanted:
                decoded[count] = _rgb(frame)
            count, last = count + 1, frame
        if count > targets[-1]:
            break
    missing = wanted.difference(decoded)
    if missing and last is not None:  # targets past the frames that decoded are clamped to the last one
        decoded.update(dict.fromkeys(missing, _rgb(last)))
    return decoded


# ----------------------------------------------------------------------------------------------------------------
# torchcodec
# ----------------------------------------------------------------------------------------------------------------


@functools.cache
def _torchcodec_problem() -> str | None:
    """None when torchcodec can decode video here, else why not."""
    try:
        import torchcodec
        from torchcodec.decoders import VideoDecoder  # noqa: F401
    except (ImportError, OSError, RuntimeError) as error:
        return f"cannot import torchcodec ({error})"
    # torchcodec imports without FFmpeg and only fails at decode time; it records the FFmpeg it loaded.
    if getattr(torchcodec, "ffmpeg_major_version", 0) is None:
        return "torchcodec found no usable FFmpeg shared libraries (libavcodec etc.; apt-get install ffmpeg)"
    return None


def _torchcodec_decoder(path: str):
    from torchcodec.decoders import VideoDecoder

    # "exact" scans the packets once (like the PyAV path), so the frame count is what the file holds.
    return VideoDecoder(path, seek_mode="exact", num_ffmpeg_threads=1, dimension_order="NHWC")


# The containers torchcodec reads right, told by their first bytes: ISO-BMFF (MP4/MOV; a box type at byte 4) and EBML
# (Matroska/WebM). In an MPEG-TS file with B-frames it returns other frames than those asked for, without an error.
_ISO_BOX_TYPES = (b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide")
_EBML_MAGIC = b"\x1a\x45\xdf\xa3"


def _torchcodec_reads(path: str) -> bool:
    """Whether torchcodec reads `path` as the PyAV reader does: a Matroska/WebM file, or an MP4/MOV file whose display
    matrix does not mirror (torchcodec turns frames by its rotation only). The others go to the PyAV reader."""
    try:
        with open(path, "rb") as file:
            head = file.read(8)
    except OSError:
        return False  # the PyAV reader names the problem
    if head[:4] == _EBML_MAGIC:
        return True
    if head[4:8] not in _ISO_BOX_TYPES:
        return False
    orientation = _orientation(_mp4_display_matrix(path))
    return orientation is None or sum(orientation) % 2 == 0  # an odd number of reversals and swaps mirrors


# torchcodec fails a whole request when one packet is bad. Its frames are bit-identical to PyAV's (tests check
# this), so such files go to the PyAV reader, which stands in a nearby frame for one that does not decode or names
# the problem.
_TORCHCODEC_ERRORS = (RuntimeError, ValueError, IndexError)


class _TorchcodecVideo(Video):
    def __init__(self, path: str) -> None:
        self.path = path
        self._pyav: _PyAVVideo | None = None
        try:
            self.decoder = _torchcodec_decoder(path)
            self.num_frames = self.decoder.metadata.num_frames
        except _TORCHCODEC_ERRORS:
            self.decoder, self.num_frames = None, 0

    def fallback(self) -> _PyAVVideo:
        """The same file opened with PyAV, for what torchcodec cannot read."""
        if self._pyav is None:
            self._pyav = _PyAVVideo(self.path)
        return self._pyav

    def close(self) -> None:
        if self._pyav is not None:
            self._pyav.close()

    def _info(self) -> VideoInfo:
        # torchcodec counts the frames shown. Fewer than the header's: the PyAV reader tells frames an MP4 edit list
        # trims off from a file cut short after its header, whose frames past its end it refuses.
        if not self.num_frames or (self.decoder.metadata.num_frames_from_header or 0) > self.num_frames:
            return self.fallback().info
        metadata = self.decoder.metadata
        # "average_fps_from_header" is FFmpeg's r_frame_rate, the rate of the timestamps. PyAV reports the average
        # rate (frames over duration), which torchcodec does not give; the two are the same where the timestamps
        # step evenly, and torchcodec's count over its span of timestamps (`average_fps`) tells that they do.
        fps, average = metadata.average_fps_from_header, metadata.average_fps
        if not fps or not average or abs(fps - average) > 0.01 * average:  # a variable frame rate
            return self.fallback().info
        return VideoInfo(self.num_frames, float(fps), metadata.height, metadata.width)

    def _read(self, indices: list[int], min_short_side: int | None) -> torch.Tensor:
        if self.num_frames and self.info.num_frames == self.num_frames:  # else the file was cut short (_info)
            try:
                frames = self.decoder.get_frames_at(_clamp(indices, self.num_frames)).data  # (T, H, W, C)
                return frames.permute(0, 3, 1, 2)  # (T, H, W, C) -> (T, C, H, W)
            except _TORCHCODEC_ERRORS:
                pass
        return self.fallback().read(indices)


# ----------------------------------------------------------------------------------------------------------------
# JPEG frame folders
# ----------------------------------------------------------------------------------------------------------------


class _NumberedNames(Sequence):
    """The names prefix + number + suffix for the numbers first, first + 1, ... (zero-padded to `width` digits): a
    frame folder's names kept as their pattern, a few bytes where a list of names would take kilobytes."""

    __slots__ = ("prefix", "width", "suffix", "first", "count")

    def __init__(self, prefix: str, width: int, suffix: str, first: int, count: int) -> None:
        # interned: a data set's folders share the same few prefixes and suffixes
        self.prefix, self.width, self.suffix = sys.intern(prefix), width, sys.intern(suffix)
        self.first, self.count = first, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> str:  # int indices only
        if not -self.count <= index < self.count:
            raise IndexError(index)
        return f"{self.prefix}{self.first + index % self.count:0{self.width}d}{self.suffix}"


class _FilledNames(Sequence):
    """The names of frames `numbers[0]`, `numbers[0] + 1`, ... up to the last of `numbers`, where a number without a
    file (not in `numbers`) takes the name of the nearest number below it: a frame folder with gaps in its numbering,
    kept in the memory of its files however long the gaps."""

    __slots__ = ("numbers", "names", "count")

    def __init__(self, numbers: list[int], names: list[str]) -> None:
        self.numbers, self.names = numbers, names  # sorted numbers and their files' names
        self.count = numbers[-1] - numbers[0] + 1

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> str:  # int indices only
        if not -self.count <= index < self.count:
            raise IndexError(index)
        return self.names[bisect.bisect_right(self.numbers, self.numbers[0] + index % self.count) - 1]


_FRAME_NAMES: dict[str, Sequence[str]] = {}  # folder -> its frames' names, listed once per process


def _frame_files(folder: str) -> Sequence[str]:
    """Names of a frame folder's frames, frame i at index i (join with the folder), listed once per process: a training
    process reads each folder many times, and listing and sorting a folder costs more than decoding a small frame.

    Frame i is the file numbered i after the folder's lowest number, so that per-frame labels, which count frames by
    their numbers, stay aligned where a number has no file: such a frame is read as the one before it, and a warning
    names the folder and how many numbers are missing. A folder is taken not to change during a run (a frame removed
    later fails its read, which names the file). The usual consecutive numbering is kept as its pattern.
    """
    names = _FRAME_NAMES.get(folder)
    if names is None:
        by_number = _list_frame_files(folder)
        numbers = list(by_number)
        missing = numbers[-1] - numbers[0] + 1 - len(numbers)
        if missing:
            log.warning("%s: %d of the frame numbers %d to %d have no file; each is read as the frame before it",
                        folder, missing, numbers[0], numbers[-1])
            names = _FilledNames(numbers, list(by_number.values()))
        else:
            names = _compact(list(by_number.values()))
        _FRAME_NAMES[folder] = names
    return names


def _list_frame_files(folder: str) -> dict[int, str]:
    """Frame number -> name of a frame folder's JPEG files of its naming pattern, ordered by number.

    The pattern is the text before and after the number that most of the files share (`frame_` and `.jpg`): a stray
    numbered file (`cover_2.jpg`) is not a frame. Of two names for one number (`f1.jpg`, `f01.jpg`), the first sorted.
    """
    try:
        names = os.listdir(folder)
    except OSError as error:
        raise VideoReadError(f"{folder}: cannot list the frame folder ({error})") from error
    patterns: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for name in names:
        if (match := _FRAME_FILE.search(name)) and not name.startswith("."):  # skips macOS "._" copies
            patterns.setdefault((name[:match.start(1)], name[match.end(1):]), []).append((int(match.group(1)), name))
    if not patterns:
        raise VideoReadError(f"{folder}: no numbered JPEG frames (expected e.g. frame_00001.jpg or <id>-000001.jpg)")
    numbered = max(sorted(patterns.items()), key=lambda item: len(item[1]))[1]  # ties: the first pattern sorted
    by_number: dict[int, str] = {}
    for number, name in sorted(numbered):
        by_number.setdefault(number, name)
    return by_number


def _compact(names: list[str]) -> Sequence[str]:
    """`names` as a _NumberedNames where they follow one pattern with consecutive numbers, else as they are."""
    match = _FRAME_FILE.search(names[0])
    digits = match.group(1)
    pattern = _NumberedNames(names[0][:match.start(1)], len(digits), names[0][match.end(1):], int(digits), len(names))
    return pattern if all(a == b for a, b in zip(pattern, names)) else names


def _jpeg_size(path: str) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            return image.size
    except OSError as error:
        raise VideoReadError(f"{path}: cannot read JPEG header ({error})") from error


def _draft_size(size: tuple[int, int], min_short_side: int) -> tuple[int, int]:
    """The size to ask Image.draft for: the frame scaled so that its short side is min_short_side (rounded up)."""
    width, height = size
    short = min(width, height)
    return -(-width * min_short_side // short), -(-height * min_short_side // short)


def _decode_jpeg(path: str, min_short_side: int | None) -> np.ndarray:
    try:
        with Image.open(path) as image:
            if min_short_side is not None and min(image.size) >= 2 * min_short_side:
                # DCT scaling by 1/2, 1/4 or 1/8: Pillow keeps both sides >= the requested size.
                image.draft("RGB", _draft_size(image.size, min_short_side))
            return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))  # (H, W, 3)
    except (OSError, SyntaxError, ValueError) as error:
        raise VideoReadError(f"{path}: cannot decode JPEG ({error})") from error


class _FrameFolder(Video):
    def __init__(self, path: str, fps: float) -> None:
        self.path, self.fps = path, float(fps)
        self.files = _frame_files(path)

    def _info(self) -> VideoInfo:
        width, height = _jpeg_size(os.path.join(self.path, self.files[0]))
        return VideoInfo(len(self.files), self.fps, height, width)

    def _read(self, indices: list[int], min_short_side: int | None) -> torch.Tensor:
        indices = _clamp(indices, len(self.files))
        decoded = {i: _decode_jpeg(os.path.join(self.path, self.files[i]), min_short_side) for i in set(indices)}
        return _stack_hwc(self.path, [decoded[i] for i in indices])
