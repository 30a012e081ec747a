"""Generate small synthetic Kinetics-style and Charades-style data sets.

    python tools/make_demo_data.py --out data/demo                      # about 30 s on 2 cores
    python tools/make_demo_data.py --out data/demo --regime motion      # the motion-only set
    python tools/make_demo_data.py --out data/demo --classes 10 --train-per-class 100 --size 128

Kinetics-style (DIR/kinetics): H.264 mp4 files at 30 fps, a keyframe every 16 frames, encoded for fast decoding
(x264's fastdecode tuning, as tools/prepare_kinetics.py encodes), in the official layout
    annotations/{train,validate}.csv   label,youtube_id,time_start,time_end,split
    {train,val}/<label>/<youtube_id>_<start:06d>_<end:06d>.mp4
    {train,val}/<label>/<youtube_id>_<start:06d>_<end:06d>.mp4.packets   its packet index (tools/index_videos.py)
    labels.txt                         one class per line, alphabetical (= the class index)
or, with --kinetics-format jpeg, a folder of frames per video in place of each mp4: <name>/frame_00001.jpg, ...

Two regimes (--regime):
- appearance (the default) is the regime Kinetics sits in, where multigrid is meant to pay: most of a class shows in
  any single frame at low resolution, motion settles the rest. Each class has its own kind of actor (a hue band and a
  bold silhouette: red discs, green squares, ...), except that two kinds come in two classes each that differ only in
  their direction (red discs moving left or right, blue stars moving up or down), so a model of single frames can be
  right on 6 of 8 videos at best. The motion is smooth and band-limited for multigrid's coarsest clip (2 frames up to
  32 frames apart, COARSE_GAP): between two such frames no actor leaves the frame or wraps, turns half a turn, or
  moves half the distance to another actor. 3-5 actors per video on a muted, static, textured background.
- motion: each class is a motion that 8-14 objects perform: moving left/right/up/down, rotating clockwise/
  counterclockwise, growing/shrinking (each object again and again from small to large, or from large to small), and
  beyond 8 classes diagonals and combinations of the three. Objects are drawn on the torus of the frame, and
  positions, orientations, sizes, shapes and colours have the same distribution in every class, so no single frame
  tells the class; only the change between frames does. Multigrid's two-frame clips cannot learn it.
In both, a horizontal flip turns left into right (and clockwise into counterclockwise), so training must not flip.

Charades-style (DIR/charades): JPEG frames at 24 fps in Charades_v1_rgb/<id>/<id>-000001.jpg, the official CSV
columns with an `actions` column like `c003 1.20 4.50;c007 0.00 3.10`, and Charades_v1_classes.txt. Class c is an
object of one colour doing one motion; it sits still outside its action segments, and other-coloured objects that
never move share the scene, so colour alone does not tell which actions happen, and when.

Everything is a pure function of --seed: each video has its own random stream, so the output does not depend on how
many worker processes render it.
"""

from __future__ import annotations

import argparse
import colorsys
import csv
import json
import math
import multiprocessing
import os
import shutil
import string
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere in the repository

KINETICS_FPS = 30
CHARADES_FPS = 24
MARKER = "demo_data.json"  # written into --out: marks the sub-folders as this tool's, and what they hold
SIZE_RANGE = (0.5, 1.5)  # every object's size factor, moving or not, lies here with the same distribution
# tools/prepare_kinetics.py's default for training videos: a short clip decodes a few short GOPs, not whole seconds
KEYFRAME_INTERVAL = 16
NOISE_PAD = 8  # the sensor-noise bank is this much larger than a frame on each side; frames take random crops


# ---- Classes ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Motion:
    """What an object does while it acts: a translation direction, a rotation sense, a size trend (0: none)."""

    dx: float = 0.0  # unit direction in image coordinates (y points down)
    dy: float = 0.0
    spin: int = 0  # +1 clockwise on screen, -1 counterclockwise
    growth: int = 0  # +1 growing, -1 shrinking


STILL = Motion()
_DIAG = 1 / math.sqrt(2)
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
DIAGONALS = {"up and left": (-_DIAG, -_DIAG), "up and right": (_DIAG, -_DIAG),
             "down and left": (-_DIAG, _DIAG), "down and right": (_DIAG, _DIAG)}
SPINS = {"clockwise": 1, "counterclockwise": -1}
GROWTHS = {"growing": 1, "shrinking": -1}


def kinetics_classes(n: int) -> list[tuple[str, Motion]]:
    """The first n motion classes: the 8 basic motions first, then diagonals, then combinations (80 at most)."""
    axes, diagonals, spins, growths = list(DIRECTIONS), list(DIAGONALS), list(SPINS), list(GROWTHS)
    groups = [
        [(d, None, None) for d in axes] + [(None, s, None) for s in spins] + [(None, None, g) for g in growths],
        [(d, None, None) for d in diagonals],
        [(d, s, None) for d in axes for s in spins],
        [(d, None, g) for d in axes for g in growths],
        [(None, s, g) for s in spins for g in growths],
        [(d, s, None) for d in diagonals for s in spins],
        [(d, None, g) for d in diagonals for g in growths],
        [(d, s, g) for d in axes + diagonals for s in spins for g in growths],
    ]
    combos = [c for group in groups for c in group]
    if not 1 <= n <= len(combos):
        raise ValueError(f"the number of Kinetics-style classes must be in 1..{len(combos)}, got {n}")
    classes = []
    for direction, spin, growth in combos[:n]:
        dx, dy = {**DIRECTIONS, **DIAGONALS}.get(direction, (0.0, 0.0))
        parts = [p for p in (direction and f"moving {direction}", spin and f"rotating {spin}", growth) if p]
        name = parts[0] if len(parts) == 1 else f"{parts[0]} while {' and '.join(parts[1:])}"
        classes.append((name, Motion(dx, dy, SPINS.get(spin, 0), GROWTHS.get(growth, 0))))
    return classes


COLOURS = {"red": 0, "orange": 30, "yellow": 60, "chartreuse": 90, "green": 120, "spring green": 150, "cyan": 180,
           "azure": 210, "blue": 240, "violet": 270, "magenta": 300, "rose": 330}  # hue in degrees
CHARADES_MOTIONS = [("moving right", Motion(dx=1.0)), ("moving left", Motion(dx=-1.0)),
                    ("moving down", Motion(dy=1.0)), ("moving up", Motion(dy=-1.0)),
                    ("spinning clockwise", Motion(spin=1)), ("spinning counterclockwise", Motion(spin=-1)),
                    ("growing", Motion(growth=1)), ("shrinking", Motion(growth=-1))]


def charades_classes(n: int) -> list[tuple[str, float, Motion]]:
    """Class c: (description, hue in [0, 1), motion); each (colour, motion) pair occurs once (96 at most)."""
    colours, motions = list(COLOURS.items()), CHARADES_MOTIONS
    if not 1 <= n <= len(colours) * len(motions):
        raise ValueError(f"the number of Charades-style classes must be in 1..{len(colours) * len(motions)}, got {n}")
    classes = []
    for c in range(n):
        # shifting the motion by c // 12 gives class c and c + 12k the same colour but different motions
        (colour, hue), (verb, motion) = colours[c % len(colours)], motions[(c + c // len(colours)) % len(motions)]
        classes.append((f"{colour} object {verb}", hue / 360, motion))
    return classes


# ---- Classes of the Kinetics-regime set (the default) ----------------------------------------------------------------

@dataclass(frozen=True)
class Kind:
    """What the actors of a class look like: a hue band (degrees, ±HUE_SPREAD) and a bold silhouette."""

    colour: str
    hue: float
    shape: str  # a key of SILHOUETTES


@dataclass(frozen=True)
class KindClass:
    """A class of the Kinetics-regime set: its actors' kind and their motion (None: each drifts its own way)."""

    name: str
    kind: Kind
    motion: Motion | None


def _polygon(points: int, phase: float = 0.0, radii: Iterable[float] = (1.0,)) -> np.ndarray:
    """(points, 2) outline of unit size: a regular polygon, or a star when radii alternate."""
    radii = list(radii)
    angles = phase + 2 * np.pi * np.arange(points) / points
    r = np.array([radii[i % len(radii)] for i in range(points)])
    return np.stack([r * np.cos(angles), r * np.sin(angles)], axis=1)


def _pacman(mouth_degrees: float = 80.0) -> np.ndarray:
    """A disc with a wedge cut out, mouth pointing along +x: its orientation shows at a glance, so does a turn."""
    half = np.deg2rad(mouth_degrees) / 2
    arc = np.linspace(half, 2 * np.pi - half, 22)
    return np.concatenate([np.stack([np.cos(arc), np.sin(arc)], axis=1), [[-0.15, 0.0]]])


SILHOUETTES = {
    "disc": _polygon(24),
    "square": _polygon(4, np.pi / 4),
    "triangle": _polygon(3, -np.pi / 2),
    "cross": np.array([[1, 0.35], [0.35, 0.35], [0.35, 1], [-0.35, 1], [-0.35, 0.35], [-1, 0.35], [-1, -0.35],
                       [-0.35, -0.35], [-0.35, -1], [0.35, -1], [0.35, -0.35], [1, -0.35]], np.float64),
    "bar": np.array([[1, 0.32], [-1, 0.32], [-1, -0.32], [1, -0.32]], np.float64),
    "pacman": _pacman(),
    "star": _polygon(10, -np.pi / 2, radii=(1.0, 0.45)),
}
HUE_SPREAD = 10.0  # degrees either side of a kind's hue: the bands of the default kinds are 60 degrees apart
KINDS = {name: Kind(*spec) for name, spec in {
    "red discs": ("red", 0, "disc"), "blue stars": ("blue", 240, "star"), "green squares": ("green", 120, "square"),
    "yellow triangles": ("yellow", 60, "triangle"), "magenta crosses": ("magenta", 300, "cross"),
    "cyan bars": ("cyan", 180, "bar"), "orange pac-men": ("orange", 30, "pacman")}.items()}
# Two kinds come in two classes each that only the motion tells apart (a translation direction); the other kinds are a
# class each whatever they do. A model of single frames can therefore be right on 6 of 8 videos at best (the 4
# single-kind classes and half of the paired ones), as on Kinetics most classes show in one frame. The turning
# pac-men (a rotation sense) come only with --classes 9 or 10: in 8 base epochs of the demo recipe X3D-XS did not
# learn their sense, with or without the eye marker.
APPEARANCE_CLASSES = [
    KindClass("red discs moving left", KINDS["red discs"], Motion(dx=-1.0)),
    KindClass("red discs moving right", KINDS["red discs"], Motion(dx=1.0)),
    KindClass("blue stars moving up", KINDS["blue stars"], Motion(dy=-1.0)),
    KindClass("blue stars moving down", KINDS["blue stars"], Motion(dy=1.0)),
    KindClass("green squares drifting", KINDS["green squares"], None),
    KindClass("yellow triangles drifting", KINDS["yellow triangles"], None),
    KindClass("magenta crosses drifting", KINDS["magenta crosses"], None),
    KindClass("cyan bars drifting", KINDS["cyan bars"], None),
    KindClass("orange pac-men turning clockwise", KINDS["orange pac-men"], Motion(spin=1)),
    KindClass("orange pac-men turning counterclockwise", KINDS["orange pac-men"], Motion(spin=-1)),
]


def appearance_classes(n: int) -> list[KindClass]:
    """The first n classes of the Kinetics-regime set (2..10)."""
    if not 2 <= n <= len(APPEARANCE_CLASSES):
        raise ValueError(f"the number of appearance classes must be in 2..{len(APPEARANCE_CLASSES)}, got {n}")
    return APPEARANCE_CLASSES[:n]


# ---- Rendering one video ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Actor:
    """An object of a video: its motion, the time span (seconds) in which it performs it, its hue (None: random)."""

    motion: Motion
    start: float = 0.0
    end: float = math.inf
    hue: float | None = None


@dataclass(frozen=True)
class VideoJob:
    """Everything needed to render one video; its own seed makes the result independent of the worker."""

    path: str  # an mp4 file, or a folder of JPEG frames named by frame_name when jpeg is set
    seed: tuple[int, ...]
    num_frames: int
    fps: int
    width: int
    height: int
    actors: tuple[Actor, ...]
    shake: int  # camera jitter in pixels, independent per frame
    jpeg: bool = False
    frame_name: str = "{folder}-{index:06d}.jpg"  # Charades' naming; Kinetics frame folders use frame_00001.jpg
    scene: KindClass | None = None  # the Kinetics-regime set: actors of this class, placed by place_kind_sprites
    keyframe_interval: int = KEYFRAME_INTERVAL
    fast_decode: bool = True  # x264's fastdecode tuning (prepare_kinetics.py --fast-decode)


class Sprite:
    """One object: an irregular polygon with an off-centre dot (so rotation shows), with its own random speeds."""

    def __init__(self, actor: Actor, rng: np.random.Generator, width: int, height: int) -> None:
        short = min(width, height)
        n = int(rng.integers(4, 8))
        # jittered star polygon: irregular enough that no rotation maps it onto itself
        angles = 2 * np.pi * (np.arange(n) + rng.uniform(-0.3, 0.3, n)) / n
        radii = rng.uniform(0.6, 1.0, n)
        self.outline = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)  # (n, 2), unit size
        self.dot = 0.6 * self.outline[0]  # on the segment to a vertex, hence inside the star-shaped polygon
        hue = rng.random() if actor.hue is None else actor.hue
        sat, val = (rng.uniform(0.6, 1.0), rng.uniform(0.55, 1.0)) if actor.hue is None else (0.9, 0.9)
        self.colour = tuple(round(255 * v) for v in colorsys.hsv_to_rgb(hue, sat, val))
        self.dot_colour = (20, 20, 20) if val * (1 - sat / 2) > 0.6 else (235, 235, 235)
        self.radius = rng.uniform(0.08, 0.14) * short
        self.pos0 = rng.uniform((0, 0), (width, height))
        self.angle0, self.phase0 = rng.uniform(0, 2 * np.pi), rng.random()
        # Any two frames less than 0.9 s apart show the motion unambiguously: the shift stays under half the frame
        # (wrapping cannot fake the opposite direction) and the turn under 180 degrees. Frames 4 apart at 64 px (the
        # demo's input) still move 2-4 px: with half these speeds X3D-XS learned nothing in 1,000 demo iterations.
        self.speed = rng.uniform(0.25, 0.5) * short  # pixels per second
        self.omega = np.deg2rad(rng.uniform(135, 200))  # radians per second
        self.period = rng.uniform(1.2, 2.0)  # seconds per growing or shrinking sawtooth
        self.restart_step = rng.uniform((0.25, 0.25), (0.75, 0.75)) * (width, height)  # far from the last place
        self.actor = actor

    def pose(self, t: float) -> tuple[np.ndarray, float, float]:
        """Position (pixels, unwrapped), angle and size factor at time t; still before and after the action."""
        a, m = self.actor, self.actor.motion
        tau = min(max(t, a.start), a.end) - a.start  # seconds spent acting so far
        cycle, phase = divmod(self.phase0 + m.growth * tau / self.period, 1.0)
        # each growing (shrinking) cycle starts at a new place, so the restart looks like one object vanishing and
        # another appearing, never like a sudden change of size in the opposite direction
        pos = self.pos0 + self.speed * tau * np.array([m.dx, m.dy]) + cycle * self.restart_step
        return pos, self.angle0 + m.spin * self.omega * tau, SIZE_RANGE[0] + (SIZE_RANGE[1] - SIZE_RANGE[0]) * phase

    def draw(self, draw: ImageDraw.ImageDraw, t: float, shift: np.ndarray, width: int, height: int) -> None:
        """Draw at time t with the camera moved by shift, wrapped around the frame edges."""
        pos, angle, scale = self.pose(t)
        size = self.radius * scale
        rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        outline, dot = self.outline @ rot.T * size, rot @ self.dot * size
        centre, r = (pos - shift) % (width, height), 0.25 * size
        for ox in (-width, 0, width):
            for oy in (-height, 0, height):
                c = centre + (ox, oy)
                if -size < c[0] < width + size and -size < c[1] < height + size:
                    draw.polygon([tuple(p) for p in outline + c], fill=self.colour)
                    draw.ellipse([c[0] + dot[0] - r, c[1] + dot[1] - r, c[0] + dot[0] + r, c[1] + dot[1] + r],
                                 fill=self.dot_colour)


# The band limit of the Kinetics-regime set. Multigrid's coarsest demo clip takes 2 frames up to 32 frames apart
# (rate 8 × T0/t = 4): between any two frames at most COARSE_GAP seconds apart no actor turns by half a turn or more,
# moves by half the distance to another actor or more, leaves the frame, or wraps around it.
COARSE_GAP = 33 / KINETICS_FPS
TRANSLATION_SPEED = (0.09, 0.13)  # × short side per second: 13.7 px at most in COARSE_GAP on a 96-pixel frame
TURN_SPEED = (130.0, 160.0)  # degrees per second: at most 176 degrees in COARSE_GAP; the pac-man's period is 360
DRIFT_SPEED = (0.02, 0.08)  # × short side per second, each drifting actor in its own direction
DRIFT_TURN = (20.0, 80.0)  # degrees per second, either sense
KIND_RADIUS = (0.10, 0.14)  # × short side
TURNING_RADIUS = (0.16, 0.21)  # × short side: turning actors are larger, so their rims move further per frame


@dataclass
class KindSprite:
    """An actor of the Kinetics-regime set: a bold silhouette in its kind's hue band, moving along a straight line
    and turning at a constant rate; it never leaves the frame, so it never wraps."""

    outline: np.ndarray  # unit-size silhouette
    colour: tuple[int, int, int]
    radius: float
    pos0: np.ndarray
    velocity: np.ndarray  # pixels per second
    angle0: float
    omega: float  # radians per second, positive clockwise on screen
    eye: np.ndarray | None = None  # a white dot at this unit-size offset: a second, high-contrast marker of the turn

    def draw(self, draw: ImageDraw.ImageDraw, t: float, shift: np.ndarray, width: int, height: int) -> None:
        """Draw at time t with the camera moved by shift."""
        angle = self.angle0 + self.omega * t
        rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        centre = self.pos0 + self.velocity * t - shift
        draw.polygon([tuple(p) for p in self.outline @ rot.T * self.radius + centre], fill=self.colour)
        if self.eye is not None:
            x, y, r = *(rot @ self.eye * self.radius + centre), 0.18 * self.radius
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(255, 255, 255))


def _kind_colour(kind: Kind, rng: np.random.Generator) -> tuple[int, int, int]:
    """A saturated, bright colour in the kind's hue band."""
    hue = (kind.hue + rng.uniform(-HUE_SPREAD, HUE_SPREAD)) % 360 / 360
    return tuple(round(255 * v) for v in colorsys.hsv_to_rgb(hue, rng.uniform(0.75, 1.0), rng.uniform(0.8, 1.0)))


def place_kind_sprites(scene: KindClass, rng: np.random.Generator, width: int, height: int,
                       seconds: float) -> list[KindSprite]:
    """3-5 actors of the scene's kind (2-3 larger ones when they turn) doing its motion, inside the frame for the
    whole video and apart enough that the band limit holds (COARSE_GAP); an actor that finds no such place in 100
    draws is left out."""
    short, motion = min(width, height), scene.motion
    speed = rng.uniform(*TRANSLATION_SPEED) * short  # a class's translation is one velocity for all its actors
    times = np.linspace(0, seconds, 7)[:, None]
    sprites: list[KindSprite] = []
    turning = motion is not None and motion.spin != 0
    for _ in range(int(rng.integers(2, 4) if turning else rng.integers(3, 6))):
        radius = rng.uniform(*(TURNING_RADIUS if turning else KIND_RADIUS)) * short
        if motion is None:
            heading = rng.uniform(0, 2 * np.pi)
            velocity = rng.uniform(*DRIFT_SPEED) * short * np.array([math.cos(heading), math.sin(heading)])
            omega = np.deg2rad(rng.uniform(*DRIFT_TURN)) * rng.choice([-1, 1])
        else:
            velocity = speed * np.array([motion.dx, motion.dy])
            omega = np.deg2rad(rng.uniform(*TURN_SPEED)) * motion.spin
        # the whole path stays inside the frame
        lo = radius + 1 - np.minimum(velocity, 0) * seconds
        hi = np.array([width, height]) - radius - 1 - np.maximum(velocity, 0) * seconds
        if np.any(hi <= lo):
            continue
        for _ in range(100):
            pos = rng.uniform(lo, hi)
            path = pos + times * velocity
            # apart by both radii, and by twice the largest shift of either actor between two coarse frames
            if all(np.linalg.norm(path - (s.pos0 + times * s.velocity), axis=1).min()
                   >= max(radius + s.radius + 3,
                          2 * COARSE_GAP * max(np.linalg.norm(velocity), np.linalg.norm(s.velocity)))
                   for s in sprites):
                sprites.append(KindSprite(SILHOUETTES[scene.kind.shape], _kind_colour(scene.kind, rng), radius,
                                          pos, velocity, rng.uniform(0, 2 * np.pi), omega,
                                          np.array([-0.1, 0.55]) if turning else None))
                break
    return sprites


def make_background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Static texture (height, width, 3) uint8: a muted smooth colour field, muted blobs and a faint grating."""
    gh, gw = rng.integers(2, 7, 2)
    hue = rng.random() + rng.normal(0, 0.08, (gh, gw))
    hsv = np.stack([hue % 1.0, rng.uniform(0.05, 0.35, (gh, gw)), rng.uniform(0.3, 0.85, (gh, gw))], axis=-1)
    image = Image.frombytes("HSV", (int(gw), int(gh)), np.round(255 * hsv).astype(np.uint8).tobytes())
    image = image.convert("RGB").resize((width, height), Image.BICUBIC)
    draw, short = ImageDraw.Draw(image), min(width, height)
    for _ in range(int(rng.integers(3, 10))):  # static muted shapes: clutter that never moves
        x, y = rng.uniform((0, 0), (width, height))
        rx, ry = rng.uniform(0.03, 0.2, 2) * short
        colour = tuple(round(255 * v) for v in colorsys.hsv_to_rgb(rng.random(), rng.uniform(0, 0.3),
                                                                  rng.uniform(0.2, 0.9)))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x - rx, y - ry, x + rx, y + ry], fill=colour)
    yy, xx = np.mgrid[0:height, 0:width]
    theta, period = rng.uniform(0, np.pi), rng.uniform(0.04, 0.2) * short
    grating = rng.uniform(3, 12) * np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period)
    return np.clip(np.asarray(image, np.float32) + grating[..., None], 0, 255).astype(np.uint8)


def render_frames(job: VideoJob) -> Iterator[np.ndarray]:
    """Yield the job's frames as (height, width, 3) uint8 RGB arrays."""
    rng = np.random.default_rng(job.seed)
    h, w, m = job.height, job.width, job.shake
    background = make_background(rng, w + 2 * m, h + 2 * m)  # margin m: camera jitter never shows an edge
    sigma = rng.uniform(2.0, 5.0)
    noise = np.round(rng.normal(0, sigma, (h + 2 * NOISE_PAD, w + 2 * NOISE_PAD, 3))).astype(np.int16)
    sprites = [Sprite(actor, rng, w, h) for actor in job.actors]
    if job.scene is not None:
        sprites += place_kind_sprites(job.scene, rng, w, h, job.num_frames / job.fps)
    for i in range(job.num_frames):
        shift = rng.integers(-m, m + 1, 2)  # (x, y)
        image = Image.fromarray(background[m + shift[1]:m + shift[1] + h, m + shift[0]:m + shift[0] + w])
        draw = ImageDraw.Draw(image)
        for sprite in sprites:
            sprite.draw(draw, i / job.fps, shift, w, h)
        ny, nx = rng.integers(0, 2 * NOISE_PAD + 1, 2)
        yield np.clip(np.asarray(image, np.int16) + noise[ny:ny + h, nx:nx + w], 0, 255).astype(np.uint8)


def write_mp4(path: str, frames: Iterable[np.ndarray], job: VideoJob) -> None:
    """Encode frames to H.264 (yuv420p) at job.fps with a keyframe every job.keyframe_interval frames, tuned for fast
    decoding unless job.fast_decode is off."""
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=job.fps)
        stream.width, stream.height, stream.pix_fmt = job.width, job.height, "yuv420p"
        # one thread: the worker pool already keeps every core busy
        keyint = job.keyframe_interval
        tune = {"tune": "fastdecode"} if job.fast_decode else {}  # no CABAC, no deblocking filter
        stream.options = {"crf": "23", "preset": "superfast", "threads": "1", **tune,
                          "x264-params": f"keyint={keyint}:min-keyint={keyint}:scenecut=0"}
        for i, array in enumerate(frames):
            # converted here on one thread: the encoder's own conversion splits frames over threads, and its output
            # was measured to vary from run to run under CPU load, which breaks "same seed, same decoded frames"
            frame = av.VideoFrame.from_ndarray(array, format="rgb24").reformat(format="yuv420p", threads=1)
            frame.pts = i  # the stream's time base is 1 / fps
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def render_video(job: VideoJob) -> int:
    """Render one job to disk; returns the bytes written (an mp4 file's packet index included)."""
    if not job.jpeg:
        import video_io  # here, not at the top: it imports torch, which the frame folders do not need

        write_mp4(job.path, render_frames(job), job)
        video_io.write_packet_index(job.path)
        return os.path.getsize(job.path) + os.path.getsize(job.path + video_io.PACKET_INDEX_SUFFIX)
    folder = Path(job.path)
    folder.mkdir(parents=True, exist_ok=True)
    total = 0
    for i, array in enumerate(render_frames(job), start=1):
        path = folder / job.frame_name.format(folder=folder.name, index=i)
        Image.fromarray(array).save(path, quality=90)
        total += path.stat().st_size
    return total


# ---- Planning the data sets (labels, file names, annotations) --------------------------------------------------------

def frame_size(short_side: int) -> tuple[int, int]:
    """(width, height) of a 4:3 landscape frame; both even, as yuv420p requires."""
    return 2 * round(short_side * 2 / 3), 2 * round(short_side / 2)


def _youtube_id(rng: np.random.Generator, taken: set[str]) -> str:
    """A new random 11-character id from YouTube's alphabet."""
    alphabet = string.ascii_letters + string.digits + "-_"
    while True:
        vid = "".join(alphabet[i] for i in rng.integers(0, len(alphabet), 11))
        if vid not in taken:
            taken.add(vid)
            return vid


def plan_kinetics(args: argparse.Namespace, root: Path) -> tuple[list[str], dict[str, list[dict]], list[VideoJob]]:
    """Labels (alphabetical), CSV rows per split, and one job per video of the Kinetics-style set."""
    rng, taken = np.random.default_rng([args.seed, 0]), set()
    width, height = frame_size(args.size)
    jpeg = args.kinetics_format == "jpeg"
    if args.regime == "motion":
        classes = [(name, motion, None) for name, motion in kinetics_classes(args.classes)]
    else:
        classes = [(c.name, None, c) for c in appearance_classes(args.classes)]
    rows, jobs = {"train": [], "val": []}, []
    for split_code, (split, per_class) in enumerate([("train", args.train_per_class), ("val", args.val_per_class)]):
        for label, motion, scene in classes:
            for _ in range(per_class):
                yid, start = _youtube_id(rng, taken), int(rng.integers(0, 300))
                end = start + args.seconds
                path = root / split / label / f"{yid}_{start:06d}_{end:06d}{'' if jpeg else '.mp4'}"
                # motion-only set: many objects, all doing the class's motion, so the signal is everywhere in the
                # frame (X3D-XS went from chance to 39 % in 320 iterations where 3-6 larger objects gave 20 %)
                actors = (Actor(motion),) * int(rng.integers(8, 15)) if scene is None else ()
                jobs.append(VideoJob(str(path), (args.seed, 0, split_code, len(jobs)), args.seconds * KINETICS_FPS,
                                     KINETICS_FPS, width, height, actors, args.shake, scene=scene,
                                     keyframe_interval=args.keyframe_interval, fast_decode=args.fast_decode,
                                     jpeg=jpeg, frame_name="frame_{index:05d}.jpg"))
                rows[split].append({"label": label, "youtube_id": yid, "time_start": start, "time_end": end,
                                    "split": split})
    for split_rows in rows.values():
        split_rows.sort(key=lambda r: (r["label"], r["youtube_id"]))  # the official files are sorted by label
    return sorted(label for label, _, _ in classes), rows, jobs


def _segments(rng: np.random.Generator, classes: list[int], length: float) -> list[tuple[int, float, float]]:
    """Action segments (class, start, end) in [0, length]; the first two both contain one instant, so they overlap."""
    anchor, segments = rng.uniform(0, length), []
    for k, c in enumerate(classes):
        duration = min(rng.uniform(2.0, 5.0), length)
        lo, hi = (max(0.0, anchor - duration), min(anchor, length - duration)) if k < 2 else (0.0, length - duration)
        start = math.floor(rng.uniform(lo, hi) * 100) / 100
        segments.append((c, start, math.floor(min(start + duration, length) * 100) / 100))
    return sorted(segments, key=lambda s: s[1])


def _charades_row(vid: str, rng: np.random.Generator, classes: list, segments: list, length: float) -> dict:
    """One CSV row in the official column order."""
    sentence = " ".join(f"The {classes[c][0].replace(' object ', ' object is ', 1)}." for c, _, _ in segments)
    colours = sorted({classes[c][0].split(" object")[0] for c, _, _ in segments})
    return {"id": vid, "subject": f"S{int(rng.integers(1, 100)):02d}",
            "scene": ["Kitchen", "Living room", "Bedroom", "Hallway", "Garage"][int(rng.integers(0, 5))],
            "quality": int(rng.integers(4, 8)), "relevance": int(rng.integers(4, 8)), "verified": "Yes",
            "script": sentence, "objects": ";".join(colours), "descriptions": sentence,
            "actions": ";".join(f"c{c:03d} {s:.2f} {e:.2f}" for c, s, e in segments), "length": f"{length:.2f}"}


def plan_charades(args: argparse.Namespace, root: Path) -> tuple[list[str], dict[str, list[dict]], list[VideoJob]]:
    """Class lines, CSV rows per subset, and one job per video of the Charades-style set."""
    rng, classes = np.random.default_rng([args.seed, 1]), charades_classes(args.charades_classes)
    width, height = frame_size(args.size)
    rows, jobs = {"train": [], "test": []}, []
    lo, hi = (round(s * CHARADES_FPS) for s in args.charades_seconds)
    for subset_code, (subset, count) in enumerate([("train", args.charades_videos),
                                                   ("test", args.charades_test_videos)]):
        for _ in range(count):
            vid, num_frames = f"D{len(jobs) + 1:04d}", int(rng.integers(lo, hi + 1))
            length = num_frames / CHARADES_FPS
            acting = int(min(rng.integers(2, 5), len(classes)))
            still = int(min(rng.integers(1, 3), len(classes) - acting))
            chosen = [int(c) for c in rng.permutation(len(classes))[:acting + still]]
            segments = _segments(rng, chosen[:acting], length)
            actors = [Actor(classes[c][2], s, e, classes[c][1]) for c, s, e in segments]
            actors += [Actor(STILL, 0.0, 0.0, classes[c][1]) for c in chosen[acting:]]  # colour present, no action
            jobs.append(VideoJob(str(root / "Charades_v1_rgb" / vid), (args.seed, 1, subset_code, len(jobs)),
                                 num_frames, CHARADES_FPS, width, height, tuple(actors), args.shake, jpeg=True))
            rows[subset].append(_charades_row(vid, rng, classes, segments, length))
    return [f"c{c:03d} {desc}" for c, (desc, _, _) in enumerate(classes)], rows, jobs


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


KINETICS_COLUMNS = ["label", "youtube_id", "time_start", "time_end", "split"]
CHARADES_COLUMNS = ["id", "subject", "scene", "quality", "relevance", "verified", "script", "objects",
                    "descriptions", "actions", "length"]


# ---- Running ---------------------------------------------------------------------------------------------------------

def prepare_output(out: Path, settings: dict, force: bool) -> bool:
    """Clear what an earlier run of this tool left in out; False when it already holds exactly these settings."""
    marker, owned = out / MARKER, [out / "kinetics", out / "charades"]
    if marker.exists():
        previous = json.loads(marker.read_text())
        if previous.get("complete") and previous.get("settings") == settings and not force:
            return False
        for folder in owned:
            shutil.rmtree(folder, ignore_errors=True)
    else:
        foreign = [str(f) for f in owned if f.exists()]
        if foreign:
            raise FileExistsError(f"{', '.join(foreign)} exists but was not made by this tool (no {marker}); "
                                  "remove it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"settings": settings, "complete": False}, indent=2) + "\n")
    return True


def run_jobs(jobs: list[VideoJob], workers: int) -> list[int]:
    """Render every job, in worker processes when workers > 1; returns the bytes written per job."""
    for job in jobs:
        Path(job.path).parent.mkdir(parents=True, exist_ok=True)
    bar = {"total": len(jobs), "desc": "rendering", "unit": "video", "disable": None}
    if workers <= 1:
        return [render_video(job) for job in tqdm(jobs, **bar)]
    # spawn, not fork: forking a process that already runs threads (torch, a test runner) can deadlock. An executor,
    # unlike multiprocessing.Pool, fails at once instead of restarting workers that die while starting up.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(tqdm(pool.map(render_video, jobs), **bar))


def write_kinetics_annotations(args: argparse.Namespace, root: Path) -> tuple[list[VideoJob], str]:
    """Write labels.txt and the two CSVs; return the jobs that render the videos and a one-line count."""
    labels, rows, jobs = plan_kinetics(args, root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "labels.txt").write_text("".join(f"{label}\n" for label in labels))
    _write_csv(root / "annotations" / "train.csv", rows["train"], KINETICS_COLUMNS)
    _write_csv(root / "annotations" / "validate.csv", rows["val"], KINETICS_COLUMNS)
    return jobs, f"{len(labels)} classes, {len(rows['train'])} train + {len(rows['val'])} val videos"


def write_charades_annotations(args: argparse.Namespace, root: Path) -> tuple[list[VideoJob], str]:
    """Write Charades_v1_classes.txt and the two CSVs; return the jobs that render the frames and a one-line count."""
    lines, rows, jobs = plan_charades(args, root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "Charades_v1_classes.txt").write_text("".join(f"{line}\n" for line in lines))
    _write_csv(root / "Charades_v1_train.csv", rows["train"], CHARADES_COLUMNS)
    _write_csv(root / "Charades_v1_test.csv", rows["test"], CHARADES_COLUMNS)
    return jobs, f"{len(lines)} classes, {len(rows['train'])} train + {len(rows['test'])} test videos"


def main(args: argparse.Namespace) -> None:
    """Generate the requested data sets under args.out and print a summary."""
    check_args(args)
    t0, out = time.perf_counter(), Path(args.out)
    # through JSON so that a tuple compares equal to the list read back from the marker
    settings = json.loads(json.dumps({k: v for k, v in vars(args).items() if k not in ("out", "workers", "force")}))
    if not prepare_output(out, settings, args.force):
        print(f"{out} already holds demo data made with these settings (use --force to remake it)")
        return
    parts = {}
    if "kinetics" in args.datasets:
        parts["kinetics"] = write_kinetics_annotations(args, out / "kinetics")
    if "charades" in args.datasets:
        parts["charades"] = write_charades_annotations(args, out / "charades")
    # Charades videos are the longest jobs: starting them first keeps every worker busy to the end
    jobs = [job for name in reversed(list(parts)) for job in parts[name][0]]
    sizes = dict(zip([job.path for job in jobs], run_jobs(jobs, args.workers)))
    lines = []
    for name, (part_jobs, counts) in parts.items():
        shape = f"{part_jobs[0].width}x{part_jobs[0].height} at {part_jobs[0].fps} fps" if part_jobs else "none"
        lines.append(f"{name}: {counts} ({sum(j.num_frames for j in part_jobs):,} frames, {shape}), "
                     f"{sum(sizes[j.path] for j in part_jobs) / 1e6:.1f} MB in {out / name}")
    lines.append(f"done in {time.perf_counter() - t0:.1f} s with {args.workers} worker process(es)")
    (out / MARKER).write_text(json.dumps({"settings": settings, "complete": True, "summary": lines}, indent=2) + "\n")
    print("\n".join(lines))


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line flags of the generator."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="Folder to write kinetics/ and charades/ into (created if needed).")
    p.add_argument("--seed", type=int, default=0, help="Everything generated is a pure function of this seed.")
    p.add_argument("--datasets", nargs="+", default=["kinetics", "charades"], choices=["kinetics", "charades"],
                   help="Which data sets to generate (default: both).")
    p.add_argument("--size", type=int, default=96,
                   help="Short side of the 4:3 frames in pixels; 96 keeps decoding cheap on a laptop CPU.")
    p.add_argument("--shake", type=int, default=0,
                   help="Camera jitter in pixels, drawn independently per frame (default: none, a steady camera).")
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8),
                   help="Processes rendering videos in parallel (default: one per core, at most 8).")
    p.add_argument("--force", action="store_true", help="Remake the data even if --out already holds the same.")
    g = p.add_argument_group("Kinetics-style set")
    g.add_argument("--regime", default="appearance", choices=["appearance", "motion"],
                   help="appearance (default): the Kinetics regime, most classes show in a single frame (a kind "
                        "of actor: hue and silhouette) and motion tells the rest apart; motion: only motion tells "
                        "classes apart, no single frame does (two-frame multigrid clips cannot learn it).")
    g.add_argument("--classes", type=int, default=8,
                   help="Classes: appearance 2..10 (default 8: 4 kinds alone, 2 kinds in 2 directions each; 9 and "
                        "10 add a rotation sense); motion "
                        "1..80 (8 basic motions, then diagonals and combinations).")
    g.add_argument("--train-per-class", type=int, default=200, help="Training videos per class.")
    g.add_argument("--val-per-class", type=int, default=50, help="Validation videos per class.")
    g.add_argument("--seconds", type=int, default=3, help="Length of each video in whole seconds (at 30 fps).")
    g.add_argument("--kinetics-format", default="mp4", choices=["mp4", "jpeg"],
                   help="mp4: H.264 files. jpeg: a folder of frame_00001.jpg files per video (the original "
                        "X3D-Multigrid repository's frames, at quality 90), which decode at reduced size for small "
                        "crops.")
    g.add_argument("--keyframe-interval", type=int, default=KEYFRAME_INTERVAL,
                   help="Frames from one keyframe to the next (default: %(default)s, tools/prepare_kinetics.py's). A "
                        "clip decodes from the keyframe before each frame it needs.")
    g.add_argument("--fast-decode", action=argparse.BooleanOptionalAction, default=True,
                   help="x264's fastdecode tuning, as tools/prepare_kinetics.py (default: on): faster to decode, "
                        "somewhat larger files (benchmarks/README.md).")
    g = p.add_argument_group("Charades-style set")
    g.add_argument("--charades-classes", type=int, default=10,
                   help="Action classes (a colour and a motion each), up to 96.")
    g.add_argument("--charades-videos", type=int, default=40, help="Training videos.")
    g.add_argument("--charades-test-videos", type=int, default=12, help="Test videos.")
    g.add_argument("--charades-seconds", type=float, nargs=2, default=(7.0, 10.0), metavar=("MIN", "MAX"),
                   help="Range of video lengths in seconds (24 fps). 7 s or more: the original Charades recipe "
                        "skips videos shorter than 162 frames.")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Reject values the generator cannot honour with a ValueError that names the flag."""
    most = 80 if args.regime == "motion" else len(APPEARANCE_CLASSES)
    if not (1 if args.regime == "motion" else 2) <= args.classes <= most:
        raise ValueError(f"--classes must be in {1 if args.regime == 'motion' else 2}..{most} for --regime "
                         f"{args.regime}, got {args.classes}")
    if not 4 <= args.charades_classes <= 96:
        raise ValueError(f"--charades-classes must be in 4..96 (videos hold 2 to 4 actions and a still object), "
                         f"got {args.charades_classes}")
    lo, hi = args.charades_seconds
    if not 2.0 <= lo <= hi:
        raise ValueError(f"--charades-seconds needs 2 <= MIN <= MAX, got {lo} {hi}")
    for flag in ("size", "seconds", "workers", "keyframe_interval"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    for flag in ("train_per_class", "val_per_class", "charades_videos", "charades_test_videos", "shake"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag.replace('_', '-')} must not be negative, got {getattr(args, flag)}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
