"""video_io: frame selection, both video backends, JPEG frame folders, reduced-size decoding, broken inputs."""

import gc
import json
import logging
import os
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import video_io
from video_io import VideoInfo, VideoReadError, probe, read_frames

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import index_videos  # noqa: E402

WIDTH, HEIGHT, NUM_FRAMES = 64, 48, 30
_TEXTURE = np.random.default_rng(0).integers(-12, 13, (HEIGHT, WIDTH, 1))


def frame_pixels(i: int) -> np.ndarray:
    """Frame i: grey level 16 + 7 i (so the level tells the index) plus a texture moving one pixel per frame."""
    return np.clip(16 + 7 * i + np.roll(_TEXTURE, i, axis=1), 0, 255).astype(np.uint8).repeat(3, axis=2)


def frame_ids(clip: torch.Tensor) -> list[int]:
    """Index of each frame of a (T, C, H, W) clip, read back from its mean grey level."""
    return [round((float(level) - 16) / 7) for level in clip.float().mean(dim=(1, 2, 3))]


def write_video(path, num_frames=NUM_FRAMES, gop=5, codec="libx264", options=None, codec_options=None,
                rotation=None, timestamps=None) -> str:
    """A small video whose frame i is frame_pixels(i); x264 puts B-frames between the keyframes every `gop`.

    `options` go to the container (muxer), `codec_options` to the encoder; `rotation` (degrees counter-clockwise,
    mirrored left to right) is the display matrix's; `timestamps` are the frames' times in milliseconds.
    """
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream(codec, rate=30)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.codec_context.gop_size = gop
        if codec_options:
            stream.options = codec_options
        if rotation is not None:
            stream.set_display_rotation(rotation[0], hflip=rotation[1])
        if timestamps is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(frame_pixels(i), format="rgb24")
            if timestamps is not None:
                frame.pts, frame.time_base = timestamps[i], Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def write_frame_folder(folder, name_of, num_frames=12, size=(WIDTH, HEIGHT)) -> str:
    """JPEG frames named name_of(1..num_frames), written in shuffled order."""
    os.makedirs(folder, exist_ok=True)
    for i in np.random.default_rng(1).permutation(num_frames):
        pixels = frame_pixels(int(i))
        if size != (WIDTH, HEIGHT):
            pixels = np.asarray(Image.fromarray(pixels).resize(size))
        Image.fromarray(pixels).save(os.path.join(folder, name_of(int(i) + 1)), quality=95)
    return str(folder)


def open_bytes(path) -> bytes:
    with open(path, "rb") as file:
        return file.read()


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> str:
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4")


needs_torchcodec = pytest.mark.skipif(
    "torchcodec" not in video_io.available_backends(),
    reason=f"torchcodec unavailable: {video_io._torchcodec_problem()}",
)
BACKENDS = [pytest.param("torchcodec", marks=needs_torchcodec), "pyav"]


# ------------------------------------------------------------------------------------------------------------------
# Video files
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_probe_video(video, backend):
    assert probe(video, backend=backend) == VideoInfo(NUM_FRAMES, 30.0, HEIGHT, WIDTH)


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_frames_order_repeats_and_clamping(video, backend):
    indices = [7, 0, 7, 29, 3, -4, 100, 16]
    clip = read_frames(video, indices, backend=backend)
    assert clip.shape == (len(indices), 3, HEIGHT, WIDTH) and clip.dtype == torch.uint8
    assert frame_ids(clip) == [7, 0, 7, 29, 3, 0, 29, 16]
    assert torch.equal(clip[0], clip[2])


@pytest.mark.parametrize(
    ("codec", "suffix"),
    [("libx264", ".mp4"), ("libx265", ".mp4"), ("libvpx-vp9", ".webm"), ("libsvtav1", ".mp4"), ("mpeg4", ".avi"),
     ("mpeg4", ".mp4")],
)
def test_sparse_reads_equal_full_decode(tmp_path, monkeypatch, codec, suffix):
    """Jumping over GOPs and skipping unwanted frames must give the same pixels as decoding every frame.

    The first read goes through the demuxer; an MP4's later reads decode from its packet index, with no demuxer.
    """
    if codec not in av.codecs_available:
        pytest.skip(f"this FFmpeg build has no {codec} encoder")
    path = write_video(tmp_path / f"clip{suffix}", gop=10, codec=codec)
    every = read_frames(path, range(NUM_FRAMES), backend="pyav")
    assert frame_ids(every) == list(range(NUM_FRAMES))
    with video_io.open_video(path) as opened:
        assert isinstance(opened, video_io._IndexedVideo) == (suffix == ".mp4")
        assert opened.info == VideoInfo(NUM_FRAMES, 30.0, HEIGHT, WIDTH)
    assert video_io.write_packet_index(path) == (suffix == ".mp4")
    if suffix == ".mp4":
        monkeypatch.setattr(av, "open", lambda *args, **kwargs: pytest.fail("the packet index was not used"))
    for from_file in (False, True):  # the index the process made, then the one written beside the video
        for indices in ([2, 13, 27], [29], [11, 12], [28, 1, 15, 15], [0, 9, 10, 19, 20]):
            if from_file:
                video_io._forget_packet_index(path)
            assert torch.equal(read_frames(path, indices, backend="pyav"), every[indices])


def test_packet_index_follows_the_file(tmp_path):
    """A file rewritten after its first read is read afresh; an index that no longer decodes is made again."""
    path = write_video(tmp_path / "clip.mp4")
    read_frames(path, [0])
    write_video(path, num_frames=20)
    assert probe(path).num_frames == 20
    assert frame_ids(read_frames(path, [19, 3, 40])) == [19, 3, 19]
    index = video_io._packet_indexes[path]
    assert len(index.packets) == 20
    broken = index.packets.copy()
    broken["pos"] = os.path.getsize(path) + 1000  # no packet's bytes where the index says they are
    video_io._packet_indexes[path] = index._replace(packets=broken)
    assert frame_ids(read_frames(path, [19, 3])) == [19, 3]
    assert video_io._packet_indexes[path].packets is not broken  # made again from the demuxer's packets


def test_packet_index_file_follows_the_video(tmp_path, monkeypatch):
    """An index file that does not match its video is reported once and the video is read through the demuxer."""
    path = write_video(tmp_path / "clip.mp4")
    index_file = path + video_io.PACKET_INDEX_SUFFIX
    assert video_io.write_packet_index(path)
    written = open_bytes(index_file)
    write_video(path, num_frames=20)  # the video changes after it was indexed
    monkeypatch.setattr(video_io, "_packet_indexes", {})
    monkeypatch.setattr(video_io, "_indexed_packets", 0)
    monkeypatch.setattr(video_io, "_warned_about_index_files", False)
    with pytest.warns(UserWarning, match="clip.mp4.packets does not match its video"):
        assert frame_ids(read_frames(path, [19, 3, 40])) == [19, 3, 19]
    assert len(video_io._packet_indexes[path].packets) == 20  # made from the demuxer's packets
    assert video_io.write_packet_index(path)
    first = video_io._packet_indexes[path].packets[0]
    with open(path, "r+b") as file:  # the same size, another byte in the first packet
        file.seek(int(first["pos"]) + int(first["size"]) - 1)
        last_byte = file.read(1)
        file.seek(-1, os.SEEK_CUR)
        file.write(bytes([last_byte[0] ^ 0xFF]))
    monkeypatch.setattr(video_io, "_packet_indexes", {})
    monkeypatch.setattr(video_io, "_warned_about_index_files", False)
    with pytest.warns(UserWarning, match="clip.mp4.packets does not match its video"):
        read_frames(path, [19, 3])
    for broken in (b"not an index", written[:-5], written.replace(b'"packets": 30', b'"packets": 3'), written[:40]):
        with open(index_file, "wb") as file:
            file.write(broken)
        monkeypatch.setattr(video_io, "_packet_indexes", {})
        monkeypatch.setattr(video_io, "_warned_about_index_files", False)
        with pytest.warns(UserWarning, match="clip.mp4.packets is not a readable packet index"):
            assert frame_ids(read_frames(path, [19, 3])) == [19, 3]
    assert video_io.write_packet_index(path)  # written again, for the new video
    monkeypatch.setattr(video_io, "_packet_indexes", {})
    monkeypatch.setattr(av, "open", lambda *args, **kwargs: pytest.fail("the index file was not used"))
    assert frame_ids(read_frames(path, [19, 3])) == [19, 3]


def test_index_videos_tool(tmp_path, capsys):
    """tools/index_videos.py indexes the MP4 files under a folder, counts those it cannot index, names broken ones."""
    write_video(tmp_path / "a.mp4")
    os.makedirs(tmp_path / "sub")
    write_video(tmp_path / "sub" / "b.MOV")
    write_video(tmp_path / "c.avi", codec="mpeg4")  # not looked at: only MP4 files are indexed
    os.replace(write_video(tmp_path / "d.ts"), tmp_path / "d.mp4")  # MPEG-TS named .mp4: no packet offsets to keep
    (tmp_path / "e.mp4").write_bytes(b"\x00" * 100)
    (tmp_path / "d.mp4.packets").write_bytes(b"stale")
    args = index_videos.get_args_parser().parse_args([str(tmp_path), "--workers", "2"])
    assert index_videos.main(args) == {"indexed": 2, "not indexable": 1, "unreadable": 1}
    assert "e.mp4: cannot open as a video" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.rglob("*.packets")) == ["a.mp4.packets", "b.MOV.packets"]


def test_packet_index_budget(tmp_path, monkeypatch):
    """Once the process's budget of indexed packets is spent, files are read through the demuxer as before."""
    first, second = write_video(tmp_path / "first.mp4"), write_video(tmp_path / "second.mp4")
    monkeypatch.setattr(video_io, "_packet_indexes", {})
    monkeypatch.setattr(video_io, "_indexed_packets", 0)
    monkeypatch.setattr(video_io, "PACKET_INDEX_BUDGET", NUM_FRAMES + NUM_FRAMES // 2)
    for path in (first, second):
        read_frames(path, [1])
    assert isinstance(video_io.open_video(first), video_io._IndexedVideo)
    assert isinstance(video_io.open_video(second), video_io._PyAVVideo)
    assert video_io._indexed_packets == NUM_FRAMES


def test_both_backends_give_identical_frames(video):
    if "torchcodec" not in video_io.available_backends():
        pytest.skip(f"torchcodec unavailable: {video_io._torchcodec_problem()}")
    for indices in ([0, 9, 18, 27], list(range(NUM_FRAMES)), [29, 29, 2, -1, 50]):
        pyav = read_frames(video, indices, backend="pyav")
        codec = read_frames(video, indices, backend="torchcodec")
        assert torch.equal(pyav, codec)  # same FFmpeg decoder and colour conversion: exact, not approximate


def upright(pixels: np.ndarray, rotation: tuple[int, bool]) -> np.ndarray:
    """A decoded (H, W, C) frame as players show it: turned rotation[0] degrees counter-clockwise, then mirrored left
    to right where rotation[1] (what PyAV's set_display_rotation writes)."""
    turned = np.rot90(pixels, rotation[0] // 90)
    return turned[:, ::-1] if rotation[1] else turned


@pytest.mark.parametrize(("rotation", "suffix"), [
    ((90, False), ".mp4"), ((-90, False), ".mp4"), ((180, False), ".mp4"), ((0, True), ".mp4"), ((90, True), ".mov"),
    ((90, False), ".mkv"),
], ids=["90", "-90", "180", "mirrored", "90-mirrored-mov", "90-mkv"])
def test_rotated_video_reads_upright(tmp_path, rotation, suffix):
    """A phone video's display matrix is applied: frames come out as players show them, and the info gives their size
    so, through the demuxer, the packet index the process made and the index file, and with torchcodec (to which MP4
    files whose matrix mirrors are not sent: it only turns frames)."""
    path = write_video(tmp_path / f"phone{suffix}", rotation=rotation)
    with av.open(path) as container:
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]  # as stored
    indices = [3, 17, 29, 3, 0]
    expected = torch.from_numpy(np.stack([upright(decoded[i], rotation) for i in indices])).permute(0, 3, 1, 2)
    info = VideoInfo(NUM_FRAMES, 30.0, *((WIDTH, HEIGHT) if rotation[0] % 180 else (HEIGHT, WIDTH)))
    indexable = suffix != ".mkv"
    for attempt in range(3):  # the demuxer, then the index this process made, then the index file
        if attempt == 2:
            assert video_io.write_packet_index(path) == indexable
            video_io._forget_packet_index(path)
        with video_io.open_video(path, "pyav") as opened:
            assert isinstance(opened, video_io._IndexedVideo) == (indexable and attempt > 0)
            assert opened.info == info
            assert torch.equal(opened.read(indices), expected)
    if "torchcodec" in video_io.available_backends():
        assert probe(path, backend="torchcodec") == info
        assert torch.equal(read_frames(path, indices, backend="torchcodec"), expected)


def test_packet_index_file_of_the_first_format(tmp_path, monkeypatch):
    """An index file written before the index kept the display matrix (format 1) still serves a video without one; for
    a rotated video it is reported, and the video is read through the demuxer, upright."""
    for name, rotation in (("plain.mp4", None), ("phone.mp4", (90, False))):
        path = write_video(tmp_path / name, rotation=rotation)
        assert video_io.write_packet_index(path)
        data = open_bytes(path + video_io.PACKET_INDEX_SUFFIX)
        magic_end = data.index(b"\n") + 1
        header_end = data.index(b"\n", magic_end) + 1
        header = json.loads(data[magic_end:header_end])
        header.pop("display_matrix", None)
        with open(path + video_io.PACKET_INDEX_SUFFIX, "wb") as file:
            file.write(b"X3D packet index 1\n" + json.dumps(header).encode("ascii") + b"\n" + data[header_end:])
    monkeypatch.setattr(video_io, "_packet_indexes", {})
    monkeypatch.setattr(video_io, "_indexed_packets", 0)
    monkeypatch.setattr(video_io, "_warned_about_index_files", False)
    with monkeypatch.context() as patched:
        patched.setattr(av, "open", lambda *args, **kwargs: pytest.fail("the index file was not used"))
        assert frame_ids(read_frames(tmp_path / "plain.mp4", [19, 3])) == [19, 3]
    with pytest.warns(UserWarning, match="phone.mp4.packets was written without the video's display matrix"):
        clip = read_frames(tmp_path / "phone.mp4", [19, 3])
    assert clip.shape[2:] == (WIDTH, HEIGHT) and frame_ids(clip) == [19, 3]


@needs_torchcodec
def test_torchcodec_gives_pyavs_fps_for_a_variable_frame_rate(tmp_path):
    """torchcodec's header rate is the rate of the timestamps, not the average PyAV reports: for a variable-rate video
    they differ (here 1000 against about 47), and the clip spans computed from them would too."""
    steps = [(1, 2, 5, 33, 100)[i % 5] for i in range(NUM_FRAMES - 1)]
    path = write_video(tmp_path / "vfr.mp4", timestamps=np.cumsum([0, *steps]).tolist())
    with av.open(path) as container:
        average = float(container.streams.video[0].average_rate)
    assert probe(path, backend="pyav").fps == average
    assert probe(path, backend="torchcodec") == probe(path, backend="pyav")


@needs_torchcodec
def test_torchcodec_backend_leaves_mpeg_ts_to_pyav(tmp_path):
    """torchcodec returns other frames than those asked for from an MPEG-TS file with B-frames, without an error."""
    path = write_video(tmp_path / "clip.ts", gop=12)
    for indices in ([0], [5], [3, 20], [29, 0, 14]):
        assert frame_ids(read_frames(path, indices, backend="torchcodec")) == indices


def test_container_without_frame_count(tmp_path):
    """Matroska headers carry no frame count: probe counts packets instead."""
    path = write_video(tmp_path / "clip.mkv", num_frames=17)
    with av.open(path) as container:
        assert container.streams.video[0].frames == 0
    assert probe(path).num_frames == 17
    assert frame_ids(read_frames(path, [16, 0, 8, 40])) == [16, 0, 8, 16]


def test_stream_without_timestamps(tmp_path):
    """A raw H.264 stream has no timestamps: frames are counted as they come out of the decoder."""
    path = write_video(tmp_path / "clip.h264")
    with av.open(path) as container:
        assert next(container.demux(container.streams.video[0])).pts is None
    assert probe(path).num_frames == NUM_FRAMES
    assert frame_ids(read_frames(path, [5, 0, 29, 5, 40, -1])) == [5, 0, 29, 5, 29, 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_file_cut_short_after_its_header_fails_past_its_end(tmp_path, backend):
    """Header at the front, data cut short (a download cut off): the frames it holds are read, frames past its end
    raise VideoReadError saying how many of the header's frames it holds, through the index as through the demuxer."""
    path = write_video(tmp_path / "full.mp4", options={"movflags": "faststart"})
    data = open_bytes(path)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.8)])
    assert probe(cut, backend=backend).num_frames == NUM_FRAMES  # the header's promise, with either backend
    for attempt in range(3):  # the demuxer, then the index this process made, then the index file
        if attempt == 2:
            assert video_io.write_packet_index(cut)
            video_io._forget_packet_index(str(cut))
        assert frame_ids(read_frames(cut, [0, 10], backend=backend)) == [0, 10]
        for indices in ([0, 10, 29], [100]):  # past its end, and clamped to past its end
            with pytest.raises(VideoReadError, match=rf"{cut}: .*holds \d+ of the {NUM_FRAMES} frames"):
                read_frames(cut, indices, backend=backend)


def test_trimmed_mp4_counts_the_frames_it_shows(tmp_path):
    """An MP4 cut without re-encoding keeps the packets from the keyframe before the cut, and its edit list marks
    those before the cut as not shown: both backends count, and read, only the frames shown."""
    source = write_video(tmp_path / "source.mp4", gop=NUM_FRAMES)  # one keyframe, at frame 0
    cut = str(tmp_path / "cut.mp4")
    with av.open(source) as original, av.open(cut, "w") as trimmed:
        stream = original.streams.video[0]
        out = trimmed.add_stream_from_template(stream)
        shift = 10 * round(1 / (30 * stream.time_base))  # the cut at frame 10 becomes time 0
        for packet in original.demux(stream):
            if packet.size:
                packet.pts, packet.dts, packet.stream = packet.pts - shift, packet.dts - shift, out
                trimmed.mux(packet)
    with av.open(cut) as container:
        assert sum(p.is_discard for p in container.demux(video=0)) == 10
    for backend in video_io.available_backends():
        for _ in range(2):  # the first open demuxes; a second one may use a packet index
            with video_io.open_video(cut, backend) as opened:
                assert opened.info.num_frames == NUM_FRAMES - 10
                assert frame_ids(opened.read(range(NUM_FRAMES - 10))) == list(range(10, NUM_FRAMES))
                assert frame_ids(opened.read([25, -1])) == [NUM_FRAMES - 1, 10]


def test_corrupt_frame_stands_in_the_nearest_earlier_frame(tmp_path, monkeypatch):
    """A frame whose packet does not decode is replaced by the frame before it, and decoding stops once a later frame
    comes out, through the demuxer as through the packet index."""
    path = write_video(tmp_path / "clip.mp4", gop=NUM_FRAMES, codec_options={"x264-params": "bframes=0"})
    with av.open(path) as container:
        packet = [p for p in container.demux(video=0) if p.size][20]
    with open(path, "r+b") as file:  # frame 20's packet zeroed in place
        file.seek(packet.pos)
        file.write(bytes(packet.size))
    sent = []
    decode_packet = video_io._decode_packet
    monkeypatch.setattr(video_io, "_decode_packet", lambda codec, p: sent.append(p) or decode_packet(codec, p))
    for opened_as in (video_io._PyAVVideo, video_io._IndexedVideo):
        sent.clear()
        with video_io.open_video(path) as opened:
            assert isinstance(opened, opened_as)
            clip = opened.read([18, 19, 20])
        assert torch.equal(clip[2], clip[1]) and frame_ids(clip[:2]) == [18, 19]
        assert len(sent) < NUM_FRAMES  # the decoder is not run to the end of the video


@pytest.mark.parametrize("backend", BACKENDS)
def test_broken_video_files_raise_video_read_error(tmp_path, video, backend):
    missing = tmp_path / "missing.mp4"
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    truncated = tmp_path / "truncated.mp4"  # ffmpeg's default layout: the index is at the end, so it is lost
    truncated.write_bytes(open_bytes(video)[:3000])
    for path in (missing, empty, garbage, truncated):
        with pytest.raises(VideoReadError, match=str(path)):
            read_frames(path, [0, 1], backend=backend)
        with pytest.raises(VideoReadError, match=str(path)):
            probe(path, backend=backend)


def test_no_file_descriptors_leak(video, tmp_path):
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to count open files")
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video" * 100)
    read_frames(video, [0])
    gc.collect()  # files other tests left to the garbage collector must not close in the middle of the count
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(30):
        for backend in video_io.available_backends():
            read_frames(video, [1, 20], backend=backend)
            probe(video, backend=backend)
            with pytest.raises(VideoReadError):
                read_frames(garbage, [0], backend=backend)
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_open_serves_info_and_several_reads(video, backend):
    with video_io.open_video(video, backend) as opened:
        assert opened.info == probe(video, backend=backend)
        first = opened.read([3, 17, 29])
        assert frame_ids(opened.read([29, 0, 12])) == [29, 0, 12]  # the decoder starts over for each read
        assert torch.equal(opened.read([3, 17, 29]), first)
    assert torch.equal(first, read_frames(video, [3, 17, 29], backend=backend))


def test_bad_arguments(video):
    with pytest.raises(ValueError, match="backend"):
        read_frames(video, [0], backend="opencv")
    with pytest.raises(ValueError, match="no frame indices"):
        read_frames(video, [])


# ------------------------------------------------------------------------------------------------------------------
# JPEG frame folders
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name_of", [lambda i: f"frame_{i:05d}.jpg", lambda i: f"AB12C-{i:06d}.jpg"], ids=["original", "charades"]
)
def test_frame_folder_patterns(tmp_path, name_of):
    folder = write_frame_folder(tmp_path / "AB12C", name_of)
    (tmp_path / "AB12C" / "notes.txt").write_text("not a frame")
    assert probe(folder, fps=24.0) == VideoInfo(12, 24.0, HEIGHT, WIDTH)
    clip = read_frames(folder, [11, 0, 5, 5, -2, 30])
    assert clip.shape == (6, 3, HEIGHT, WIDTH) and clip.dtype == torch.uint8
    assert frame_ids(clip) == [11, 0, 5, 5, 0, 11]


@pytest.mark.parametrize("numbers, name", [
    (range(1, 13), "frame_{:05d}.jpg"),  # the original repository's
    (range(1, 13), "AB12C-{:06d}.jpg"),  # Charades'
    (range(95, 107), "{}.jpg"),  # no padding: 95.jpg ... 106.jpg
    (range(95, 107), "f{:02d}.jpg"),  # padded to 2 digits, then 3
])
def test_frame_names_are_listed_once_and_kept_compact(tmp_path, monkeypatch, numbers, name):
    folder = tmp_path / "v"
    folder.mkdir()
    for n in numbers:
        (folder / name.format(n)).touch()
    (folder / "notes.txt").touch()
    names = video_io._frame_files(str(folder))
    assert list(names) == [name.format(n) for n in numbers]
    assert isinstance(names, video_io._NumberedNames)
    assert len(names) == 12 and names[-1] == name.format(numbers[-1])
    with pytest.raises(IndexError):
        names[12]

    def no_listing(path):
        raise AssertionError(f"{path} listed again")

    monkeypatch.setattr(os, "listdir", no_listing)  # a second read of the folder in this process lists nothing
    assert video_io._frame_files(str(folder)) is names


def test_frame_folder_with_gaps_and_a_stray_file(tmp_path, caplog):
    """Frame i is the file numbered i after the lowest, so that per-frame labels stay aligned where numbers are
    missing: such a frame is read as the one before it, with one warning per folder; a numbered file of another name
    is no frame."""
    folder = write_frame_folder(tmp_path / "gaps", lambda i: f"frame_{i:05d}.jpg", num_frames=8)
    for number in (4, 6, 7):
        os.remove(os.path.join(folder, f"frame_{number:05d}.jpg"))
    Image.fromarray(frame_pixels(20)).save(os.path.join(folder, "cover_2.jpg"))
    with caplog.at_level(logging.WARNING, logger="video_io"):
        assert probe(folder) == VideoInfo(8, 30.0, HEIGHT, WIDTH)
        assert frame_ids(read_frames(folder, range(8))) == [0, 1, 2, 2, 4, 4, 4, 7]
        assert frame_ids(read_frames(folder, [5, -1, 20])) == [4, 0, 7]
    assert [record.getMessage() for record in caplog.records] == [
        f"{folder}: 3 of the frame numbers 1 to 8 have no file; each is read as the frame before it"]


def test_frame_numbers_with_gaps_keep_their_places(tmp_path):
    """Every tenth frame, numbered as in the source: 111 frames, each file standing for ten; a gap of a billion numbers
    takes no memory."""
    for name, numbers in (("tenth", range(7, 120, 10)), ("far", (1, 2, 1_000_000_000))):
        (tmp_path / name).mkdir()
        for n in numbers:
            (tmp_path / name / f"img{n}.jpeg").touch()
    tenth = video_io._frame_files(str(tmp_path / "tenth"))
    assert len(tenth) == 111 and tenth[0] == tenth[9] == "img7.jpeg" and tenth[10] == "img17.jpeg"
    assert tenth[-1] == tenth[110] == "img117.jpeg"
    with pytest.raises(IndexError):
        tenth[111]
    far = video_io._frame_files(str(tmp_path / "far"))
    assert len(far) == 1_000_000_000 and far[1] == "img2.jpeg" and far[500_000] == "img2.jpeg"
    assert far[-1] == "img1000000000.jpeg"


def test_reduced_size_decoding(tmp_path):
    size = (320, 240)
    folder = write_frame_folder(tmp_path / "big", lambda i: f"frame_{i:05d}.jpg", num_frames=3, size=size)
    full = read_frames(folder, [0, 2])
    assert full.shape[-2:] == (240, 320)
    for min_short_side, expected in [
        (200, (240, 320)),
        (120, (120, 160)),
        (100, (120, 160)),
        (60, (60, 80)),
        (50, (60, 80)),
        (20, (30, 40)),
    ]:
        small = read_frames(folder, [0, 2], min_short_side=min_short_side)
        assert small.shape[-2:] == expected and min(small.shape[-2:]) >= min_short_side
        reference = F.interpolate(full.float(), size=expected, mode="bilinear", antialias=True)
        assert (small.float() - reference).abs().mean() < 4.0  # DCT scaling ~ an antialiased resize


def test_broken_frame_folders_raise_video_read_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VideoReadError, match=str(empty)):
        read_frames(empty, [0])
    with pytest.raises(VideoReadError, match=str(empty)):
        probe(empty)

    folder = write_frame_folder(tmp_path / "cut", lambda i: f"frame_{i:05d}.jpg", num_frames=3)
    frame = os.path.join(folder, "frame_00002.jpg")
    data = open_bytes(frame)
    with open(frame, "wb") as file:
        file.write(data[: len(data) // 2])
    assert frame_ids(read_frames(folder, [0])) == [0]
    with pytest.raises(VideoReadError, match=frame):
        read_frames(folder, [0, 1])

    mixed = write_frame_folder(tmp_path / "mixed", lambda i: f"frame_{i:05d}.jpg", num_frames=2)
    Image.fromarray(frame_pixels(0)[:32]).save(os.path.join(mixed, "frame_00003.jpg"))
    with pytest.raises(VideoReadError, match="different sizes"):
        read_frames(mixed, [0, 2])
