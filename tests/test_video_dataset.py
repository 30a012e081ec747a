"""video_dataset: how the generic clip dataset treats a video that fails to decode."""

from test_video_io import NUM_FRAMES, open_bytes, write_video

from multigrid import ClipSpec
from video_dataset import VideoClipDataset


class VideoIndexDataset(VideoClipDataset):
    """One class; a clip's target is the index of the video it came from."""

    classes = ["a"]

    def target(self, video: int, indices: list[int], fps: float) -> int:
        return video


def test_video_cut_short_is_replaced_and_counted(tmp_path):
    """A download cut short after its header fails where a clip reaches past its end: training takes another video,
    testing flags its views (view index -1), and both count it as a failed video."""
    good = write_video(tmp_path / "good.mp4")
    full = open_bytes(write_video(tmp_path / "full.mp4", options={"movflags": "faststart"}))
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(full[: int(len(full) * 0.8)])
    settings = dict(frames=8, sampling_rate=4, train_crop=32, train_jitter=(36, 44), test_crop=32,
                    max_failure_fraction=0.5)
    train = VideoIndexDataset([good, str(cut)], **settings)
    assert NUM_FRAMES < 8 * 4  # a clip of 8 frames at rate 4 spans the whole video, its missing end included
    clip, video = train[ClipSpec(1, 8, 32, 4, 4, seed=0)]
    assert video == 0 and tuple(clip.shape) == (3, 8, 32, 32) and train.failure_count == 1
    test = VideoIndexDataset([good, str(cut)], mode="test", num_temporal_views=2, num_spatial_crops=1, **settings)
    assert [(video, view) for _, _, video, view in (test[i] for i in range(len(test)))] == [
        (0, 0), (0, 1), (1, -1), (1, -1)]
    assert test.failure_count == 1
