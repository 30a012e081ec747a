"""Clip transforms: short-side scale jitter, crops, flip and normalisation of uint8 (T, C, H, W) clips.

Training (`train_clip`): random short side in the jitter range -> random square crop -> horizontal flip with
p = 0.5 (one decision for the whole clip) -> normalise to float (C, T, H, W). Testing (`test_clip`): short side
resized to the test crop -> one of 3 square crops (left/centre/right, or top/centre/bottom for portrait frames;
the centre offset is ceil((L - S) / 2) as in PySlowFast) -> normalise.

Resizing is bilinear with align_corners=False and no antialiasing (as PySlowFast), done on uint8 in channels-last
memory, several times faster than in float32 (benchmarks/README.md), and differs from the float result by rounding
only (at most 1 grey level). The decoders hand over channels-last clips already. Every random choice draws from the
optional `torch.Generator` in a fixed order (scale, crop y, crop x, flip), so a seed reproduces the clip exactly. The
crop size is an argument of each call because multigrid changes it from one iteration to the next. Spatial ops only
touch the last two dimensions.
"""

import torch
import torch.nn.functional as F

MEAN = (0.45, 0.45, 0.45)
STD = (0.225, 0.225, 0.225)


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [low, high], both ends included."""
    return int(torch.randint(low, high + 1, (1,), generator=generator))


def _check_crop(clip: torch.Tensor, size: int) -> tuple[int, int]:
    height, width = clip.shape[-2:]
    if height < size or width < size:
        raise ValueError(f"cannot crop {size}x{size} from frames of {height}x{width}")
    return height, width


def short_side_resize(clip: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (T, C, H, W) so the short side is `size`; the long side becomes floor(long * size / short)."""
    if clip.dim() != 4:
        raise ValueError(f"expected a (T, C, H, W) clip, got shape {tuple(clip.shape)}")
    height, width = clip.shape[-2:]
    if min(height, width) == size:
        return clip
    # Integer floor of long * size / short: a float floor can land one pixel short.
    new_size = (size, width * size // height) if height <= width else (height * size // width, size)
    clip = clip.contiguous(memory_format=torch.channels_last)  # the fast uint8 kernel works on channels-last
    return F.interpolate(clip, size=new_size, mode="bilinear", align_corners=False, antialias=False)


def random_short_side_scale(
    clip: torch.Tensor, min_size: int, max_size: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Resize so the short side is an integer drawn uniformly from [min_size, max_size]."""
    return short_side_resize(clip, _randint(min_size, max_size, generator))


def random_crop(clip: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A size x size crop at a uniformly random position, the same for every frame (a view, no copy)."""
    height, width = _check_crop(clip, size)
    y = _randint(0, height - size, generator)
    x = _randint(0, width - size, generator)
    return clip[..., y : y + size, x : x + size]


def spatial_crop(clip: torch.Tensor, size: int, index: int) -> torch.Tensor:
    """Test crop `index` 0/1/2: left/centre/right of landscape or square frames, top/centre/bottom of portrait."""
    if index not in (0, 1, 2):
        raise ValueError(f"spatial crop index must be 0, 1 or 2, got {index}")
    height, width = _check_crop(clip, size)
    y = -(-(height - size) // 2)  # ceil((H - S) / 2), the centre offset of PySlowFast
    x = -(-(width - size) // 2)
    if height > width:
        y = (0, y, height - size)[index]
    else:
        x = (0, x, width - size)[index]
    return clip[..., y : y + size, x : x + size]


def random_horizontal_flip(
    clip: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Mirror every frame left-right with probability p (one draw for the whole clip)."""
    if float(torch.rand(1, generator=generator)) < p:
        return clip.flip(-1)
    return clip


def normalize(clip: torch.Tensor, mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD) -> torch.Tensor:
    """uint8 (T, C, H, W) in 0..255 -> float32 (C, T, H, W) equal to (clip / 255 - mean) / std per channel."""
    out = clip.permute(1, 0, 2, 3).to(torch.float32, memory_format=torch.contiguous_format)  # -> (C, T, H, W)
    # One subtraction and one multiplication on the float copy, with 255 folded into the constants.
    shift = torch.tensor(mean, dtype=torch.float64).mul(255).to(torch.float32).view(-1, 1, 1, 1)
    scale = torch.tensor(std, dtype=torch.float64).mul(255).reciprocal().to(torch.float32).view(-1, 1, 1, 1)
    return out.sub_(shift).mul_(scale)


def train_clip(
    clip: torch.Tensor,
    crop: int,
    jitter: tuple[int, int],
    generator: torch.Generator | None = None,
    mean: tuple[float, ...] = MEAN,
    std: tuple[float, ...] = STD,
    flip_prob: float = 0.5,
) -> torch.Tensor:
    """Training augmentation of uint8 (T, C, H, W): scale jitter -> random crop -> flip -> float (C, T, H, W).

    `flip_prob=0` for tasks where left and right differ (a flipped "moving left" clip shows "moving right").
    """
    if jitter[0] < crop or jitter[1] < jitter[0]:
        raise ValueError(f"short-side jitter {tuple(jitter)} must satisfy crop {crop} <= min <= max")
    clip = random_short_side_scale(clip, jitter[0], jitter[1], generator)
    clip = random_crop(clip, crop, generator)
    clip = random_horizontal_flip(clip, p=flip_prob, generator=generator)
    return normalize(clip, mean, std)


def test_clip(
    clip: torch.Tensor,
    crop: int,
    spatial_index: int | None,
    mean: tuple[float, ...] = MEAN,
    std: tuple[float, ...] = STD,
) -> torch.Tensor:
    """Test view of uint8 (T, C, H, W): short side to `crop` -> crop 0/1/2 (None: centre) -> float (C, T, H, W)."""
    clip = short_side_resize(clip, crop)
    clip = spatial_crop(clip, crop, 1 if spatial_index is None else spatial_index)
    return normalize(clip, mean, std)


test_clip.__test__ = False  # its name starts with "test": tells pytest it is not a test when a test module imports it
