"""Photo-like generated animals (`search synth --style photos`): a family is a body plan.

Why a second style: the coat-texture style of `synth` is learnt from scratch by a small CNN in
a few epochs, so it cannot show what the real data set shows, that ImageNet features beat a
model trained from scratch on ~30 photos a family. Here a family is a body plan (legs, tail,
head, wings/fins/crest, body proportions), shared by its species; colour and coat pattern
belong to each species and are drawn at random, not from a per-family palette, so two families
may look alike in colour (a family of one species still has one colour, as in real photos).
Each photo puts the animal at a random pose, size and place on a crop of a real photograph
(the two that scikit-learn ships, so nothing is downloaded), with occluding leaves, light
casts, blur and noise: the nuisance variation that 30 examples are too few to learn from
scratch. Nothing was fitted to a score: the grid is every combination of the parts below.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = [
    "BodyPlan",
    "Coat",
    "body_plans",
    "hsv_to_rgb",
    "pick_combinations",
    "render_photo",
    "species_look",
]

_LEGS = (0, 2, 4, 6)
_TAILS = ("none", "short", "long", "fan")
_HEADS = ("round", "snout", "horns", "ears")
_EXTRAS = ("none", "wings", "fins", "crest")
_ASPECTS = (1.5, 2.1, 2.8)  # body length over body height
_COAT_PATTERNS = ("plain", "stripes", "spots", "bands")
Limb = tuple[np.ndarray, float]  # a polyline in body units and its thickness
_SUPERSAMPLE = 2  # drawn at twice the size, then downsampled: smooth edges like a lens


@dataclass(frozen=True)
class BodyPlan:
    """What makes a family: the parts of its animal and their proportions."""

    legs: int
    tail: str
    head: str
    extra: str
    aspect: float
    leg_length: float


@dataclass(frozen=True)
class Coat:
    """What a species looks like on top of its family's shape: colour and pattern."""

    hue: float
    saturation: float
    value: float
    pattern: str
    freq: float


def pick_combinations(
    axes: Sequence[Sequence[object]], n: int, rng: np.random.Generator
) -> list[tuple]:
    """`n` distinct combinations of one value per axis, drawn without replacement."""
    grid = list(itertools.product(*axes))
    return [grid[int(i)] for i in rng.choice(len(grid), size=n, replace=False)]


def body_plans(n: int, rng: np.random.Generator) -> list[BodyPlan]:
    """`n` distinct body plans, drawn without replacement from every combination of parts."""
    parts = pick_combinations((_LEGS, _TAILS, _HEADS, _EXTRAS, _ASPECTS), n, rng)
    return [BodyPlan(*p, leg_length=float(rng.uniform(0.5, 0.9))) for p in parts]


def species_look(plan: BodyPlan, seed: int, fam: int, sp: int) -> tuple[BodyPlan, Coat]:
    """A species: its family's plan with slightly other proportions, and its own colour and
    pattern, drawn at random, so that two families may well look alike in colour."""
    r = np.random.default_rng([seed, fam, sp, 3])
    shape = BodyPlan(
        plan.legs,
        plan.tail,
        plan.head,
        plan.extra,
        aspect=plan.aspect * float(r.uniform(0.9, 1.1)),
        leg_length=plan.leg_length * float(r.uniform(0.85, 1.15)),
    )
    coat = Coat(
        hue=float(r.uniform(0.0, 1.0)),
        saturation=float(r.uniform(0.2, 0.85)),
        value=float(r.uniform(0.35, 0.9)),
        pattern=_COAT_PATTERNS[int(r.integers(len(_COAT_PATTERNS)))],
        freq=float(r.uniform(2.0, 6.0)),
    )
    return shape, coat


def render_photo(
    plan: BodyPlan,
    coat: Coat,
    r: np.random.Generator,
    image_px: int,
    size: tuple[int, int] | None = None,
) -> Image.Image:
    """One photo of an animal of `plan` wearing `coat`, posed and lit at random by `r`: about
    `image_px` square, or exactly `size` (width, height) when given (`image_px` then only
    scales the blur), so full-size photos of any aspect can be drawn small and upscaled."""
    if size is None:
        w = int(round(image_px * r.uniform(0.9, 1.1))) * _SUPERSAMPLE
        h = int(round(image_px * r.uniform(0.9, 1.1))) * _SUPERSAMPLE
    else:
        w, h = size[0] * _SUPERSAMPLE, size[1] * _SUPERSAMPLE
    canvas = _scene(r, w, h)
    pose = _pose(r, w, h)
    _shadow(canvas, pose, plan)
    _animal(canvas, plan, coat, pose, r)
    _occluders(canvas, r)
    canvas *= np.array([r.uniform(0.8, 1.2) for _ in range(3)], dtype=np.float32)  # light cast
    picture = Image.fromarray(_to_uint8(canvas)).resize(
        (w // _SUPERSAMPLE, h // _SUPERSAMPLE), Image.LANCZOS
    )
    if r.random() < 0.25:  # out of focus
        picture = picture.filter(ImageFilter.GaussianBlur(r.uniform(0.5, 1.5) * image_px / 128))
    pixels = np.asarray(picture, dtype=np.float32) / 255.0
    pixels += r.normal(0.0, r.uniform(0.01, 0.04), pixels.shape).astype(np.float32)
    return Image.fromarray(_to_uint8(pixels))


def _to_uint8(canvas: np.ndarray) -> np.ndarray:
    return (np.clip(canvas, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


@functools.lru_cache(maxsize=1)
def _photographs() -> tuple[np.ndarray, ...]:
    """scikit-learn's two sample photographs, shipped inside its wheel (no download)."""
    from sklearn.datasets import load_sample_images

    return tuple(load_sample_images().images)


def _scene(r: np.random.Generator, w: int, h: int) -> np.ndarray:
    """The background: usually a random crop of a real photograph, flipped and recoloured;
    else a smooth colour field. Real textures make the background as busy as a field photo."""
    if r.random() < 0.7:
        photo = _photographs()[int(r.integers(2))]
        ph, pw = photo.shape[:2]
        side = int(r.uniform(0.25, 1.0) * min(ph, pw))
        y0, x0 = int(r.integers(0, ph - side + 1)), int(r.integers(0, pw - side + 1))
        crop = Image.fromarray(photo[y0 : y0 + side, x0 : x0 + side])
        if r.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        canvas = np.asarray(crop.resize((w, h), Image.BILINEAR), dtype=np.float32) / 255.0
        canvas = canvas[..., r.permutation(3)]  # a green field or a red one
    else:
        coarse = r.uniform(0.15, 0.85, (4, 4, 3))
        small = Image.fromarray((coarse * 255).astype(np.uint8))
        canvas = np.asarray(small.resize((w, h), Image.BILINEAR), dtype=np.float32) / 255.0
    return np.ascontiguousarray(canvas * r.uniform(0.6, 1.1))


@dataclass(frozen=True)
class _Pose:
    """Where body coordinates (body half-length 1, +x to the head) land in the picture."""

    cx: float
    cy: float
    scale: float  # pixels per body unit
    angle: float  # radians
    flip: bool

    def to_pixels(self, pts: np.ndarray) -> list[tuple[float, float]]:
        x = -pts[:, 0] if self.flip else pts[:, 0]
        y = pts[:, 1]
        c, s = np.cos(self.angle), np.sin(self.angle)
        px = self.cx + self.scale * (c * x - s * y)
        py = self.cy + self.scale * (s * x + c * y)
        return list(zip(px.tolist(), py.tolist(), strict=True))


def _pose(r: np.random.Generator, w: int, h: int) -> _Pose:
    """Anywhere near the middle, a fifth of the frame long, tilted, facing left or right."""
    side = min(w, h)
    return _Pose(
        cx=float(r.uniform(0.35, 0.65) * w),
        cy=float(r.uniform(0.35, 0.6) * h),
        scale=float(r.uniform(0.14, 0.26) * side),
        angle=float(np.deg2rad(r.uniform(-25.0, 25.0))),
        flip=bool(r.random() < 0.5),
    )


def _ellipse(cx: float, cy: float, a: float, b: float, n: int = 40) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    return np.stack([cx + a * np.cos(t), cy + b * np.sin(t)], axis=1)


def _parts(plan: BodyPlan, r: np.random.Generator) -> tuple[list[np.ndarray], list[Limb]]:
    """Polygons (filled) and limbs (thick lines) of the animal, in body coordinates.
    Species-level proportions are jittered per photo a little, as real poses differ."""
    b = 1.0 / plan.aspect
    polys = [_ellipse(0.0, 0.0, 1.0, b)]
    limbs: list[Limb] = []
    hr = 0.32 + 0.04 * r.standard_normal()
    hx, hy = 1.0 + 0.55 * hr, -0.45 * b
    polys.append(_ellipse(hx, hy, hr, hr * 0.9))
    if plan.head == "snout":
        polys.append(np.array([[hx, hy - 0.35 * hr], [hx + 2.2 * hr, hy], [hx, hy + 0.5 * hr]]))
    elif plan.head == "horns":
        for dx in (-0.3, 0.25):
            base = hx + dx * hr
            polys.append(
                np.array([[base - 0.15, hy - 0.6 * hr], [base - 0.35, hy - 2.4 * hr],
                          [base + 0.12, hy - 0.7 * hr]])
            )  # fmt: skip
    elif plan.head == "ears":
        for dx in (-0.45, 0.2):
            polys.append(_ellipse(hx + dx * hr, hy - 1.3 * hr, 0.28 * hr, 0.8 * hr, 16))
    legs = np.linspace(-0.6, 0.6, plan.legs) if plan.legs else []
    for x in legs:
        swing = 0.25 * r.standard_normal()
        top = (x, 0.5 * b)
        foot = (x + swing * plan.leg_length, b + plan.leg_length)
        limbs.append((np.array([top, foot]), 0.13))
    if plan.tail == "short":
        limbs.append((np.array([[-0.9, -0.1 * b], [-1.45, -0.45 * b]]), 0.14))
    elif plan.tail == "long":
        wave = 0.3 * r.standard_normal()
        limbs.append(
            (np.array([[-0.9, 0.0], [-1.5, 0.3 + wave], [-2.0, -0.1 + wave], [-2.3, -0.5]]), 0.09)
        )
    elif plan.tail == "fan":
        polys.append(np.array([[-0.85, 0.0], [-1.7, -0.7 * b - 0.2], [-1.7, 0.7 * b + 0.2]]))
    if plan.extra == "wings":
        lift = 0.4 * r.standard_normal()
        polys.append(np.array([[-0.4, -0.6 * b], [0.45, -0.7 * b], [-0.6, -b - 1.1 - lift]]))
    elif plan.extra == "fins":
        polys.append(np.array([[-0.35, -0.8 * b], [0.25, -0.9 * b], [-0.45, -b - 0.55]]))
        polys.append(np.array([[-0.3, 0.8 * b], [0.15, 0.9 * b], [-0.45, b + 0.4]]))
    elif plan.extra == "crest":
        for x in np.linspace(-0.7, 0.6, 6):
            top = -b * np.sqrt(max(0.0, 1.0 - x * x)) * 0.95
            polys.append(np.array([[x - 0.1, top + 0.05], [x, top - 0.32], [x + 0.1, top + 0.05]]))
    return polys, limbs


def _mask(w: int, h: int, pose: _Pose, polys: list[np.ndarray], limbs: list[Limb]) -> np.ndarray:
    """Where the animal is: 1 inside, 0 outside (smoothed later by the downsampling)."""
    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    for poly in polys:
        draw.polygon(pose.to_pixels(poly), fill=255)
    for pts, width in limbs:
        xy = pose.to_pixels(pts)
        wpx = max(1, int(width * pose.scale))
        draw.line(xy, fill=255, width=wpx, joint="curve")
        for x, y in (xy[0], xy[-1]):
            rr = wpx / 2
            draw.ellipse([x - rr, y - rr, x + rr, y + rr], fill=255)
    return np.asarray(img, dtype=np.float32)[..., None] / 255.0


def _animal(
    canvas: np.ndarray, plan: BodyPlan, coat: Coat, pose: _Pose, r: np.random.Generator
) -> None:
    h, w = canvas.shape[:2]
    polys, limbs = _parts(plan, r)
    mask = _mask(w, h, pose, polys, limbs)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c, s = np.cos(pose.angle), np.sin(pose.angle)
    dx, dy = xx - pose.cx, yy - pose.cy
    u = (c * dx + s * dy) / pose.scale  # back to body coordinates
    v = (-s * dx + c * dy) / pose.scale
    hue = (coat.hue + r.uniform(-0.03, 0.03)) % 1.0
    fur = hsv_to_rgb(hue, coat.saturation, coat.value * r.uniform(0.85, 1.1))
    pattern = _coat_pattern(coat, u, v, r)[..., None]
    colour = fur * (1.0 - 0.65 * pattern)
    light = np.clip(1.15 - 0.35 * (v * plan.aspect + 1.0) / 2.0, 0.6, 1.2)[..., None]
    colour = colour * light
    canvas *= 1.0 - mask
    canvas += mask * colour
    eye = pose.to_pixels(np.array([[1.0 + 0.75 * 0.32, -0.55 / plan.aspect]]))[0]
    er = max(1.0, 0.05 * pose.scale)
    ey0, ey1 = int(eye[1] - er), int(eye[1] + er) + 1
    ex0, ex1 = int(eye[0] - er), int(eye[0] + er) + 1
    if 0 <= ey0 and ey1 <= h and 0 <= ex0 and ex1 <= w:
        canvas[ey0:ey1, ex0:ex1] *= 0.15


def _coat_pattern(coat: Coat, u: np.ndarray, v: np.ndarray, r: np.random.Generator) -> np.ndarray:
    if coat.pattern == "plain":
        return np.zeros_like(u)
    phase = r.uniform(0.0, 2.0 * np.pi)
    f = coat.freq * r.uniform(0.9, 1.1)
    if coat.pattern == "stripes":
        s = np.sin(f * np.pi * u + phase)
    elif coat.pattern == "spots":
        s = np.sin(f * np.pi * u + phase) * np.sin(f * np.pi * v + phase) - 0.4
    else:  # bands along the body
        s = np.sin(f * np.pi * v + phase)
    return np.clip(s * 3.0 + 0.5, 0.0, 1.0)


def _shadow(canvas: np.ndarray, pose: _Pose, plan: BodyPlan) -> None:
    """A soft shadow under the animal, as the sun would cast one."""
    h, w = canvas.shape[:2]
    ground = 1.0 / plan.aspect + plan.leg_length
    centre = pose.to_pixels(np.array([[0.0, ground]]))[0]
    img = Image.new("L", (w, h), 0)
    rx, ry = 1.3 * pose.scale, 0.2 * pose.scale
    ImageDraw.Draw(img).ellipse(
        [centre[0] - rx, centre[1] - ry, centre[0] + rx, centre[1] + ry], fill=110
    )
    img = img.filter(ImageFilter.GaussianBlur(0.15 * pose.scale))
    canvas *= 1.0 - np.asarray(img, dtype=np.float32)[..., None] / 255.0


def _occluders(canvas: np.ndarray, r: np.random.Generator) -> None:
    """Leaves and grass in front of the animal in some photos."""
    if r.random() > 0.4:
        return
    h, w = canvas.shape[:2]
    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    for _ in range(int(r.integers(1, 4))):
        x, y = r.uniform(0, w), r.uniform(0.4 * h, h)
        length, width = r.uniform(0.2, 0.5) * h, r.uniform(0.02, 0.06) * w
        tilt = r.uniform(-0.5, 0.5)
        tip = (x + np.sin(tilt) * length, y - np.cos(tilt) * length)
        draw.polygon([(x - width, y), tip, (x + width, y)], fill=255)
    mask = np.asarray(img, dtype=np.float32)[..., None] / 255.0
    leaf = hsv_to_rgb(r.uniform(0.18, 0.4), r.uniform(0.4, 0.8), r.uniform(0.25, 0.6))
    canvas *= 1.0 - mask
    canvas += mask * leaf


def hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    """One HSV colour to RGB in [0, 1] (colorsys without the per-call tuple juggling)."""
    i = int(h * 6.0) % 6
    f = h * 6.0 - int(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb, dtype=np.float32)
