"""transforms: sizes and positions of resizes and crops, flips, normalisation values, determinism under a seed."""

import pytest
import torch
import torch.nn.functional as F

import transforms as T


def random_clip(frames=4, height=48, width=64, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (frames, 3, height, width), dtype=torch.uint8, generator=generator)


def coordinate_clip(frames=3, height=40, width=101) -> torch.Tensor:
    """Channel 0 holds the column index, channel 1 the row index, channel 2 the frame index."""
    cols = torch.arange(width).expand(frames, height, width)
    rows = torch.arange(height).view(1, height, 1).expand(frames, height, width)
    times = torch.arange(frames).view(frames, 1, 1).expand(frames, height, width)
    return torch.stack([cols, rows, times], dim=1).to(torch.uint8)  # (T, C, H, W)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------------------------
# Resizing
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("height", "width", "size", "expected"),
    [
        (256, 340, 182, (182, 241)),
        (340, 256, 182, (241, 182)),
        (240, 320, 320, (320, 426)),
        (128, 170, 79, (79, 104)),
        (100, 100, 64, (64, 64)),
    ],
)
def test_short_side_resize_shapes(height, width, size, expected):
    out = T.short_side_resize(random_clip(2, height, width), size)
    assert out.shape == (2, 3, *expected) and out.dtype == torch.uint8


def test_short_side_resize_values():
    clip = random_clip(3, 48, 64)
    assert T.short_side_resize(clip, 48) is clip  # already the right size: untouched
    out = T.short_side_resize(clip, 36)
    reference = F.interpolate(clip.float(), size=(36, 48), mode="bilinear", align_corners=False, antialias=False)
    assert (out.float() - reference).abs().max() <= 1.01  # uint8 kernel: rounding only
    flat = torch.full((2, 3, 30, 50), 77, dtype=torch.uint8)
    assert torch.equal(T.short_side_resize(flat, 43), torch.full((2, 3, 43, 71), 77, dtype=torch.uint8))
    with pytest.raises(ValueError, match="clip"):
        T.short_side_resize(clip[0], 24)


def test_random_short_side_scale_range_and_seed():
    clip = random_clip(2, 24, 32)
    sizes = {min(T.random_short_side_scale(clip, 20, 23, seeded(s)).shape[-2:]) for s in range(60)}
    assert sizes == {20, 21, 22, 23}  # both ends included
    assert torch.equal(
        T.random_short_side_scale(clip, 20, 40, seeded(3)), T.random_short_side_scale(clip, 20, 40, seeded(3))
    )


# ------------------------------------------------------------------------------------------------------------------
# Crops and flips
# ------------------------------------------------------------------------------------------------------------------


def test_random_crop_is_one_window_for_all_frames():
    clip = coordinate_clip()
    offsets = set()
    for seed in range(40):
        out = T.random_crop(clip, 32, seeded(seed))
        assert out.shape == (3, 3, 32, 32)
        x, y = int(out[0, 0, 0, 0]), int(out[0, 1, 0, 0])
        assert torch.equal(out, clip[..., y : y + 32, x : x + 32])
        offsets.add((y, x))
    assert all(0 <= y <= 8 and 0 <= x <= 69 for y, x in offsets) and len(offsets) > 30
    with pytest.raises(ValueError, match="cannot crop 41x41"):
        T.random_crop(clip, 41)


@pytest.mark.parametrize(
    ("height", "width", "axis", "starts"),
    [(40, 101, "x", (0, 31, 61)), (101, 40, "y", (0, 31, 61)), (40, 40, "x", (0, 0, 0)), (41, 64, "x", (0, 12, 24))],
    ids=["landscape", "portrait", "square", "landscape-even"],
)
def test_spatial_crop_positions(height, width, axis, starts):
    clip = coordinate_clip(2, height, width)
    for index, start in enumerate(starts):
        out = T.spatial_crop(clip, 40, index)
        assert out.shape == (2, 3, 40, 40)
        x, y = int(out[0, 0, 0, 0]), int(out[0, 1, 0, 0])
        assert (x if axis == "x" else y) == start  # centre = ceil((L - S) / 2): (101 - 40) -> 31, (64 - 40) -> 12
        other_length = height if axis == "x" else width
        assert (y if axis == "x" else x) == -(-(other_length - 40) // 2)  # the other axis stays centred
    with pytest.raises(ValueError, match="0, 1 or 2"):
        T.spatial_crop(clip, 40, 3)


def test_flip_is_the_same_for_every_frame():
    clip = coordinate_clip(4, 8, 16)
    outcomes = []
    for seed in range(30):
        out = T.random_horizontal_flip(clip, generator=seeded(seed))
        flipped = int(out[0, 0, 0, 0]) == 15
        assert torch.equal(out, clip.flip(-1) if flipped else clip)  # all frames flipped, or none
        outcomes.append(flipped)
    assert 5 < sum(outcomes) < 25
    assert torch.equal(T.random_horizontal_flip(clip, p=0.0), clip)
    assert torch.equal(T.random_horizontal_flip(clip, p=1.0), clip.flip(-1))


# ------------------------------------------------------------------------------------------------------------------
# Normalisation and the full pipelines
# ------------------------------------------------------------------------------------------------------------------


def test_normalize_values_and_layout():
    clip = torch.tensor([0, 255, 115, 57], dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 3, 2, 5).contiguous()
    out = T.normalize(clip)
    assert out.shape == (3, 4, 2, 5) and out.dtype == torch.float32 and out.is_contiguous()
    expected = (torch.tensor([0, 255, 115, 57], dtype=torch.float64) / 255 - 0.45) / 0.225
    assert torch.allclose(out[:, :, 1, 3].double(), expected.expand(3, 4), atol=1e-6, rtol=0)
    assert out[0, 0, 0, 0].item() == pytest.approx(-2.0, abs=1e-6)
    assert out[0, 1, 0, 0].item() == pytest.approx(0.55 / 0.225, abs=1e-6)

    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    clip = random_clip(2, 3, 4)
    out = T.normalize(clip, mean, std)
    reference = (clip.permute(1, 0, 2, 3).double() / 255 - torch.tensor(mean).view(3, 1, 1, 1).double()) / torch.tensor(
        std
    ).view(3, 1, 1, 1).double()
    assert torch.allclose(out.double(), reference, atol=1e-5, rtol=0)


def test_train_clip_is_the_composition_and_deterministic():
    clip = random_clip(4, 48, 64)
    out = T.train_clip(clip, 32, (36, 44), seeded(7))
    assert out.shape == (3, 4, 32, 32) and out.dtype == torch.float32
    generator = seeded(7)
    manual = T.random_short_side_scale(clip, 36, 44, generator)
    manual = T.random_horizontal_flip(T.random_crop(manual, 32, generator), generator=generator)
    assert torch.equal(out, T.normalize(manual))
    assert torch.equal(out, T.train_clip(clip, 32, (36, 44), seeded(7)))
    assert not all(torch.equal(out, T.train_clip(clip, 32, (36, 44), seeded(s))) for s in range(8, 12))


def test_train_clip_crop_changes_per_call():
    clip = random_clip(8, 128, 170)
    generator = seeded(0)
    for crop, jitter in [(56, (64, 80)), (79, (91, 114)), (112, (128, 160))]:
        assert T.train_clip(clip, crop, jitter, generator).shape == (3, 8, crop, crop)
    with pytest.raises(ValueError, match="jitter"):
        T.train_clip(clip, 112, (100, 120))


def test_test_clip_views():
    clip = coordinate_clip(2, 60, 100)
    views = [T.test_clip(clip, 30, index, mean=(0, 0, 0), std=(1 / 255,) * 3) for index in (0, 1, 2, None)]
    assert all(view.shape == (3, 2, 30, 30) for view in views)
    assert torch.equal(views[3], views[1])  # no index: the centre crop
    resized = T.short_side_resize(clip, 30)  # 60x100 -> 30x50
    assert resized.shape[-2:] == (30, 50)
    for index, view in enumerate(views[:3]):
        assert torch.allclose(view, T.spatial_crop(resized, 30, index).permute(1, 0, 2, 3).float(), atol=1e-4)
    # Channel 2 kept the frame index, so the layout is (C, T, H, W).
    assert torch.allclose(views[0][2], torch.arange(2.0).view(2, 1, 1).expand(2, 30, 30), atol=1e-4)


def test_train_clip_flip_probability():
    clip = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    clip[..., 8:] = 255  # dark left half, bright right half
    for p, bright_right in ((0.0, True), (1.0, False)):
        for seed in range(10):
            out = T.train_clip(clip, 16, (16, 16), torch.Generator().manual_seed(seed), flip_prob=p)
            assert (out[..., -1].mean() > out[..., 0].mean()) == bright_right
