"""Deterministic MVTec-style sample datasets: real scikit-image textures with synthetic defects and masks.

Every image is a random crop of a 512x512 grey texture (``skimage.data``) under slight lighting drift; defect
images carry one scratch, stain, crack or missing chip blended in with soft edges, and a 0/255 mask of the
pixels it altered. Pixels depend only on (seed, category, split, kind, index), never on other counts.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import cv2
import numpy as np
from skimage import data as skimage_data

log = logging.getLogger(__name__)

CATEGORIES: tuple[str, ...] = ("brick", "gravel", "grass")
DEFECT_TYPES: tuple[str, ...] = ("scratch", "stain", "crack", "missing")

_SPLITS: tuple[str, ...] = ("train", "calibration", "test")
_MASK_FOLDERS = {"calibration": "calibration_ground_truth", "test": "ground_truth"}
_MASK_ALPHA = 0.3  # blend weight above which a pixel counts as defective in the mask
_REFERENCE_SIZE_PX = 256  # the defect sizes below are for 256 px images and scale with image_size
_SUBPIXEL_BITS = 4  # cv2 drawing `shift`: coordinates in 1/16 px, so thin lines are placed smoothly

Image = np.ndarray  # (H, W) float32 grey levels, 0..255 before the final clip


@dataclass(frozen=True, slots=True)
class SampleDataSpec:
    """How many square grey images to write per category, and the seed that fixes every pixel."""

    image_size: int = 256
    n_train: int = 60
    n_calibration_good: int = 12
    n_calibration_defect: int = 12
    n_test_good: int = 20
    n_test_defect: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                msg = f"SampleDataSpec.{field.name}={value!r} must be a non-negative integer"
                raise ValueError(msg)
        if not 64 <= self.image_size <= 512:
            msg = f"SampleDataSpec.image_size={self.image_size} is outside [64, 512]; the textures are 512x512"
            raise ValueError(msg)
        if self.n_train < 1:
            msg = "SampleDataSpec.n_train=0; a category needs at least one good training image"
            raise ValueError(msg)

    def counts(self, split: str) -> tuple[int, int]:
        """(good, defect) image counts of one split."""
        return {
            "train": (self.n_train, 0),
            "calibration": (self.n_calibration_good, self.n_calibration_defect),
            "test": (self.n_test_good, self.n_test_defect),
        }[split]


def make_sample_dataset(
    out_dir: Path, *, categories: Sequence[str] = CATEGORIES, spec: SampleDataSpec | None = None
) -> list[Path]:
    """Writes one MVTec-style folder per category under out_dir and returns their paths."""
    spec = spec or SampleDataSpec()
    wanted = (categories,) if isinstance(categories, str) else tuple(dict.fromkeys(categories))
    unknown = [name for name in wanted if name not in CATEGORIES]
    if unknown:
        msg = f"unknown sample categories {unknown}; choose from {', '.join(CATEGORIES)}"
        raise ValueError(msg)
    return [_write_category(Path(out_dir) / name, name, spec) for name in wanted]


def _write_category(root: Path, category: str, spec: SampleDataSpec) -> Path:
    """Replaces root with a fresh train/calibration/test tree of one category."""
    if root.exists():
        shutil.rmtree(root)
    texture = getattr(skimage_data, category)()
    category_index = CATEGORIES.index(category)
    for split_index, split in enumerate(_SPLITS):
        n_good, n_defect = spec.counts(split)
        for image_index in range(n_good):
            key = (spec.seed, category_index, split_index, 0, image_index)
            image, _ = _render_sample(texture, key, image_size=spec.image_size, defect_type=None)
            _write_png(root / split / "good" / f"{image_index:03d}.png", image)
        for defect_index in range(n_defect):
            type_index, image_index = defect_index % len(DEFECT_TYPES), defect_index // len(DEFECT_TYPES)
            defect_type = DEFECT_TYPES[type_index]
            key = (spec.seed, category_index, split_index, 1 + type_index, image_index)
            image, mask = _render_sample(texture, key, image_size=spec.image_size, defect_type=defect_type)
            _write_png(root / split / defect_type / f"{image_index:03d}.png", image)
            _write_png(root / _MASK_FOLDERS[split] / defect_type / f"{image_index:03d}_mask.png", mask)
    log.info("wrote sample category %s (%d px images) to %s", category, spec.image_size, root)
    return root


def _write_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image):
        msg = f"could not write {path}; is the folder writable and the disk not full?"
        raise OSError(msg)


def _render_sample(
    texture: np.ndarray, key: tuple[int, ...], *, image_size: int, defect_type: str | None
) -> tuple[np.ndarray, np.ndarray]:
    """One image and its mask, both (image_size, image_size) uint8; the mask is 0/255, empty when good.

    The surface (crop, lighting, noise) and the defect draw from separate streams, so the same key without a
    defect gives the identical surface.
    """
    surface_rng = np.random.default_rng(np.random.SeedSequence([*key, 0]))
    defect_rng = np.random.default_rng(np.random.SeedSequence([*key, 1]))
    image = _random_crop(texture, surface_rng, image_size)
    alpha = np.zeros_like(image)
    if defect_type is not None:
        image, alpha = _DEFECT_PAINTERS[defect_type](image, defect_rng, image_size / _REFERENCE_SIZE_PX)
    image = _lighting_drift(image, surface_rng)
    mask = np.where(alpha > _MASK_ALPHA, 255, 0).astype(np.uint8)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask


def _random_crop(texture: np.ndarray, rng: np.random.Generator, size: int) -> Image:
    """A size x size crop at a random place, turned by a random multiple of 90 degrees and maybe mirrored."""
    top, left = rng.integers(0, texture.shape[0] - size + 1), rng.integers(0, texture.shape[1] - size + 1)
    crop = np.rot90(texture[top : top + size, left : left + size], k=int(rng.integers(4)))
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop, dtype=np.float32)


def _lighting_drift(image: Image, rng: np.random.Generator) -> Image:
    """Gain 0.9-1.1, offset +-8 grey levels and Gaussian sensor noise (sigma 2), as on a real line camera."""
    gain, offset = rng.uniform(0.9, 1.1), rng.uniform(-8.0, 8.0)
    return image * gain + offset + rng.normal(0.0, 2.0, image.shape).astype(np.float32)


def _add_scratch(image: Image, rng: np.random.Generator, scale: float) -> tuple[Image, Image]:
    """A thin, slightly bowed groove 60-120 px long and 3-4 px wide at 256 px: a bright (or dark) line whose
    one edge shows the opposite tone, as a scratch's lip catches the light."""
    size = image.shape[0]
    length, theta = rng.uniform(60, 120) * scale, rng.uniform(0, math.pi)
    bow = rng.uniform(-0.12, 0.12) * length
    centre = _random_centre(rng, size, margin=length / 2 + abs(bow) + 6 * scale)
    along, across = np.array([math.cos(theta), math.sin(theta)]), np.array([-math.sin(theta), math.cos(theta)])
    t = np.linspace(-0.5, 0.5, 48)[:, None]
    points = centre + t * length * along + (1 - 4 * t**2) * bow * across
    width = rng.uniform(3, 4) * scale
    lip_points = points + across * rng.choice([-1.0, 1.0]) * (width / 2 + 1.0 * scale)
    # Fade the ends so the line starts and stops like a real scratch, not a pen stroke.
    fade = np.clip(_distance_to_line_end(size, points) / (10 * scale), 0.0, 1.0)
    core = _draw_polyline(size, points, width=width, sigma_px=0.6 * scale) * fade
    lip = _draw_polyline(size, lip_points, width=width / 2, sigma_px=0.6 * scale) * fade * 0.6
    bright, dark = rng.uniform(215, 245), rng.uniform(15, 40)
    core_level, lip_level = (bright, dark) if rng.random() < 0.7 else (dark, bright)
    image = image * (1 - lip) + lip_level * lip
    return image * (1 - core) + core_level * core, np.maximum(core, lip)


def _draw_polyline(size: int, points: np.ndarray, *, width: float, sigma_px: float) -> Image:
    """(size, size) float32 alpha of an open polyline through points ((N, 2) x, y px)."""
    canvas = np.zeros((size, size), np.uint8)
    cv2.polylines(canvas, [_subpixel(points)], False, 255, max(1, round(width)), cv2.LINE_AA, _SUBPIXEL_BITS)
    return _soften(canvas, sigma_px=sigma_px)


def _add_stain(image: Image, rng: np.random.Generator, scale: float) -> tuple[Image, Image]:
    """An irregular, blotchy blob 30-55 px across that darkens the texture multiplicatively to 20-40 %;
    the texture stays visible inside and the dried edge is darkest."""
    size = image.shape[0]
    diameter = rng.uniform(30, 55) * scale
    centre = _random_centre(rng, size, margin=diameter)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle, squash = rng.uniform(0, math.pi), rng.uniform(0.6, 1.0)
    u = ((xx - centre[0]) * math.cos(angle) + (yy - centre[1]) * math.sin(angle)) / (diameter / 2)
    v = (-(xx - centre[0]) * math.sin(angle) + (yy - centre[1]) * math.cos(angle)) / (diameter / 2 * squash)
    noise = _smooth_noise(rng, size, cell_px=max(3.0, diameter / 4))
    blob = ((1 - u**2 - v**2) + 0.6 * (noise - 0.5)) > 0.15  # the centre always survives: 1 - 0.3 > 0.15
    alpha = _soften(blob.astype(np.uint8) * 255, sigma_px=max(1.0, 2.0 * scale)) * rng.uniform(0.85, 1.0)
    factor = rng.uniform(0.2, 0.4)
    ring = 4 * alpha * (1 - alpha)  # dried stains are darkest at their edge (the coffee-ring effect)
    mottle = _smooth_noise(rng, size, cell_px=5 * scale)  # blotches give the stain a grain of its own
    stained = image * factor * (0.5 + mottle) * (1 - 0.7 * ring)
    return image * (1 - alpha) + stained * alpha, alpha


@dataclass(frozen=True, slots=True)
class _CrackArm:
    start: np.ndarray  # (2,) x, y in px
    theta_rad: float
    length_px: float
    width_px: float
    may_branch: bool


def _add_crack(image: Image, rng: np.random.Generator, scale: float) -> tuple[Image, Image]:
    """A dark jagged crack growing both ways from a point, 90-140 px end to end and up to 10 px wide at 256 px,
    tapering towards its tips and branching."""
    size = image.shape[0]
    length, theta, width = rng.uniform(90, 140) * scale, rng.uniform(0, 2 * math.pi), max(2.0, 10.0 * scale)
    centre = _random_centre(rng, size, margin=length / 2 + width + 2)
    arms = [_CrackArm(centre, theta + turn, length / 2, width, may_branch=True) for turn in (0.0, math.pi)]
    canvas = np.zeros((size, size), np.uint8)
    while arms:
        arms.extend(_draw_crack_arm(canvas, rng, arms.pop(), step_px=4 * scale))
    alpha = _soften(canvas, sigma_px=0.5 * scale)
    return image * (1 - rng.uniform(0.85, 0.95) * alpha), alpha


def _draw_crack_arm(canvas: np.ndarray, rng: np.random.Generator, arm: _CrackArm, *, step_px: float) -> list[_CrackArm]:
    """Draws one random-walk arm with ragged edges onto canvas (uint8, in place); returns its branches."""
    points, heading, travelled, branches = [arm.start], arm.theta_rad, 0.0, []
    while travelled < arm.length_px:
        heading += rng.normal(0.0, 0.15)  # slow drift of the crack's course
        zigzag = heading + rng.normal(0.0, 0.5)  # jagged steps around it
        step = rng.uniform(0.75, 1.5) * step_px
        points.append(points[-1] + step * np.array([math.cos(zigzag), math.sin(zigzag)]))
        travelled += step
        if arm.may_branch and rng.random() < 0.12:
            turn = rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.1)
            remaining = (arm.length_px - travelled) * rng.uniform(0.3, 0.6)
            if remaining > step_px:
                branches.append(_CrackArm(points[-1], heading + turn, remaining, arm.width_px * 0.6, False))
    path = np.array(points)
    tangent = np.gradient(path, axis=0)
    normal = np.stack([-tangent[:, 1], tangent[:, 0]], 1) / np.linalg.norm(tangent, axis=1, keepdims=True)
    # Each side of the gap breaks away on its own, so the two edges get independent ragged widths.
    taper = np.linspace(1, 0.1, len(path))[:, None]
    half_widths = arm.width_px / 2 * taper * rng.uniform(0.5, 1.0, (len(path), 2))
    outline = np.vstack([path + normal * half_widths[:, :1], (path - normal * half_widths[:, 1:])[::-1]])
    cv2.fillPoly(canvas, [_subpixel(outline)], 255, cv2.LINE_AA, _SUBPIXEL_BITS)
    cv2.polylines(canvas, [_subpixel(path)], False, 255, 1, cv2.LINE_AA, _SUBPIXEL_BITS)
    return branches


def _add_missing(image: Image, rng: np.random.Generator, scale: float) -> tuple[Image, Image]:
    """A chipped-out hole 20-50 px across: a smooth dark floor, a shadowed wall and a darkened rim."""
    size = image.shape[0]
    radius = rng.uniform(10, 25) * scale
    centre = _random_centre(rng, size, margin=1.4 * radius + 4 * scale)
    angles = np.linspace(0, 2 * math.pi, 18, endpoint=False) + rng.uniform(0, 0.3, 18)
    wobble = np.convolve(np.tile(rng.normal(0, 1, 18), 3), [0.25, 0.5, 0.25], "same")[18:36]
    outline = centre + (radius * (1 + 0.22 * wobble))[:, None] * np.stack([np.cos(angles), np.sin(angles)], 1)
    canvas = np.zeros((size, size), np.uint8)
    cv2.fillPoly(canvas, [_subpixel(outline)], 255, cv2.LINE_AA, _SUBPIXEL_BITS)
    hole = _soften(canvas, sigma_px=max(0.8, 1.2 * scale))
    light = rng.uniform(0, 2 * math.pi)
    light_dir = np.array([math.cos(light), math.sin(light)], np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    gradient = ((xx - centre[0]) * light_dir[0] + (yy - centre[1]) * light_dir[1]) / radius * 8
    level = rng.uniform(20, 55)
    # The wall on the lit side throws a crescent of shadow onto the floor of the hole.
    wall = np.clip(hole - _shifted(hole, light, 3 * scale), 0, 1)
    fill = (level + gradient) * (1 - 0.5 * wall)
    rim = np.clip(_soften(canvas, sigma_px=3 * scale) - hole, 0, 1)
    return image * (1 - 0.5 * rim) * (1 - hole) + fill * hole, hole


_DEFECT_PAINTERS: dict[str, Callable[[Image, np.random.Generator, float], tuple[Image, Image]]] = {
    "scratch": _add_scratch,
    "stain": _add_stain,
    "crack": _add_crack,
    "missing": _add_missing,
}


def _random_centre(rng: np.random.Generator, size: int, *, margin: float) -> np.ndarray:
    """(2,) x, y at least margin px from every border (the image centre when that is impossible)."""
    low, high = margin, size - margin
    if low >= high:
        return np.array([size / 2, size / 2])
    return rng.uniform(low, high, 2)


def _shifted(alpha: Image, angle_rad: float, distance_px: float) -> Image:
    """alpha moved distance_px towards angle_rad (sub-pixel, zero-filled)."""
    dx, dy = distance_px * math.cos(angle_rad), distance_px * math.sin(angle_rad)
    return cv2.warpAffine(alpha, np.array([[1, 0, dx], [0, 1, dy]], np.float32), alpha.shape[::-1])


def _smooth_noise(rng: np.random.Generator, size: int, *, cell_px: float) -> Image:
    """(size, size) float32 value noise in 0..1 whose features are about cell_px wide."""
    cells = max(2, math.ceil(size / cell_px) + 1)
    grid = rng.random((cells, cells), dtype=np.float32)
    return np.clip(cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC), 0, 1)


def _soften(canvas: np.ndarray, *, sigma_px: float) -> Image:
    """A 0..255 drawing as a 0..1 float32 alpha with Gaussian-blurred (anti-aliased) edges."""
    return cv2.GaussianBlur(canvas.astype(np.float32) / 255, (0, 0), sigmaX=max(sigma_px, 0.3))


def _distance_to_line_end(size: int, points: np.ndarray) -> Image:
    """(size, size) float32 distance in px to the nearer end of a polyline."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    ends = [np.hypot(xx - x, yy - y) for x, y in (points[0], points[-1])]
    return np.minimum(*ends)


def _subpixel(points: np.ndarray) -> np.ndarray:
    """(N, 2) float px as int32 fixed point for cv2's `shift` argument."""
    return np.rint(points * (1 << _SUBPIXEL_BITS)).astype(np.int32)
