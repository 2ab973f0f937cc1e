"""SynthFaces rendering: procedural face identities and one rendered image of an identity.

Every identity is a parameter vector (face outline and jaw, skin tone, hair style and colour, eyes, brows, nose,
mouth, ears, and optional traits such as a beard, glasses or a mole) drawn around a few shared prototypes, so many
identities look alike, as real faces do. Every image adds nuisance: pose (in-plane rotation, scale, shift, a
pseudo-3D yaw and pitch), expression (smile, open mouth, raised brows, blink, gaze), illumination gradient, colour
cast, background clutter, partial occlusion, blur, sensor noise and JPEG compression at a random quality.

Faces are drawn with PIL polygons at twice the output size and reduced 2x for anti-aliasing. A render depends only
on the identity and on the numpy Generator it is given, which fixes every nuisance; ``data_loader.synthface`` seeds
one per image and writes the data sets. Any change to the rendered bytes must bump its ``GENERATOR_VERSION``.

Usage: ``render_face(make_identity(seed, identity), rng, size)`` gives JPEG bytes and the five landmarks.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

NUM_PROTOTYPES = 8

# Seed-sequence domain tags, so prototype and identity streams never share entropy (image streams use others).
_TAG_PROTOTYPES, _TAG_IDENTITY = 1, 2


@dataclass(frozen=True)
class NuisanceConfig:
    """Per-image nuisance amplitudes at strength 1 (`nuisance` scales amplitudes and caps probabilities at 1).

    Angles are in degrees, lengths in units of the image side, colour factors are log-scale standard deviations.
    """

    rotation_std: float = 5.0
    rotation_max: float = 15.0
    scale_mean: float = 1.0
    centre_y: float = 0.5
    scale_log_std: float = 0.035
    shift_std: float = 0.025
    yaw_max: float = 22.0
    pitch_max: float = 6.0
    aspect_log_std: float = 0.025
    smile_max: float = 1.0
    mouth_open_prob: float = 0.3
    brow_raise_prob: float = 0.3
    blink_prob: float = 0.08
    gaze_max: float = 0.35
    glasses_off_prob: float = 0.12
    illumination_max: float = 0.35
    brightness_log_std: float = 0.1
    contrast_log_std: float = 0.06
    cast_log_std: float = 0.05
    background_contrast: float = 0.6
    clutter_max_shapes: int = 4
    occlusion_prob: float = 0.2
    blur_prob: float = 0.5
    blur_max: float = 1.3
    noise_max: float = 8.0
    jpeg_quality_min: int = 35
    jpeg_quality_max: int = 95


NUISANCE = NuisanceConfig()

# Continuous identity genes in [0, 1]; decoded into geometry and colours by `_decode_identity`.
_GENES = tuple("""
    face_w face_h jaw chin skin_tone skin_warmth hair_hue hair_shade hair_volume hairline parting eye_dx eye_y
    eye_w eye_h eye_tilt iris_hue iris_r brow_thick brow_arch brow_tilt brow_gap brow_len nose_y nose_w
    nose_bridge mouth_y mouth_w lip_thick lip_colour ear_size ear_y mole_x mole_y
    """.split())
_G = {name: i for i, name in enumerate(_GENES)}
_NUM_HAIR_STYLES = 7  # bald, short, bob, long, curly, fringe, bun
_BEARDS = ("none", "stubble", "full", "goatee", "moustache")
_BEARD_PROBS = (0.55, 0.12, 0.13, 0.1, 0.1)
_GLASSES_PROBS = (0.72, 0.14, 0.14)  # none, round, rectangular
_IDENTITY_SPREAD = 0.13
_TRAIT_INHERIT_PROB = 0.75

_SKIN_LIGHT = np.array([238.0, 204.0, 182.0])
_SKIN_DARK = np.array([92.0, 58.0, 42.0])
_HAIR_PALETTE = np.array(
    [[25, 22, 22], [62, 40, 28], [105, 70, 42], [140, 62, 32], [196, 160, 98], [150, 146, 142]], dtype=np.float64
)
_IRIS_PALETTE = np.array([[60, 38, 22], [110, 72, 40], [70, 110, 70], [60, 100, 150], [120, 130, 140]], np.float64)
_FRAME_COLOURS = ((20, 20, 20), (90, 60, 30), (150, 150, 160), (120, 20, 30))


@dataclass(frozen=True)
class Identity:
    """Decoded identity: geometry in face coordinates (origin at the face centre, unit = image side, y down)."""

    a: float  # face half-width
    b: float  # face half-height (chin)
    jaw: float
    chin_power: float
    skin: np.ndarray
    hair: np.ndarray
    hair_style: int
    hair_margin: float
    hairline: float
    parting: float
    eye_dx: float
    eye_y: float
    eye_w: float
    eye_h: float
    eye_tilt: float
    almond: bool
    iris: np.ndarray
    iris_r: float
    brow_thick: float
    brow_arch: float
    brow_tilt: float
    brow_gap: float
    brow_len: float
    nose_y: float
    nose_w: float
    nose_bridge: float
    mouth_y: float
    mouth_w: float
    lip_thick: float
    lips: np.ndarray
    ear_size: float
    ear_y: float
    beard: str
    glasses: int  # 0 none, 1 round, 2 rectangular
    frame: tuple[int, int, int]
    mole: tuple[float, float] | None


def _lerp(lo: float, hi: float, t: float) -> float:
    return lo + (hi - lo) * float(t)


def _palette(palette: np.ndarray, t: float) -> np.ndarray:
    pos = float(t) * (len(palette) - 1)
    i = min(int(pos), len(palette) - 2)
    return palette[i] + (palette[i + 1] - palette[i]) * (pos - i)


@lru_cache(maxsize=8)
def _prototypes(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns the prototype genes (K, G) and discrete traits (K, 4): hair style, almond eyes, beard, glasses."""
    rng = np.random.default_rng([seed, _TAG_PROTOTYPES])
    genes = rng.uniform(0.08, 0.92, size=(NUM_PROTOTYPES, len(_GENES)))
    traits = np.stack(
        [
            rng.integers(0, _NUM_HAIR_STYLES, NUM_PROTOTYPES),
            rng.integers(0, 2, NUM_PROTOTYPES),
            rng.choice(len(_BEARDS), NUM_PROTOTYPES, p=_BEARD_PROBS),
            rng.choice(3, NUM_PROTOTYPES, p=_GLASSES_PROBS),
        ],
        axis=1,
    )
    return genes, traits


def make_identity(seed: int, identity: int) -> Identity:
    """Draws identity `identity` around one of the seed's prototypes (independent of the number of identities).

    Args:
        seed: SynthFaces seed (fixes the prototypes).
        identity: non-negative identity id.

    Returns:
        The decoded identity.
    """
    rng = np.random.default_rng([seed, _TAG_IDENTITY, identity])
    proto_genes, proto_traits = _prototypes(seed)
    k = int(rng.integers(NUM_PROTOTYPES))
    genes = np.clip(proto_genes[k] + rng.normal(0.0, _IDENTITY_SPREAD, len(_GENES)), 0.0, 1.0)
    fresh = (
        int(rng.integers(_NUM_HAIR_STYLES)),
        int(rng.integers(2)),
        int(rng.choice(len(_BEARDS), p=_BEARD_PROBS)),
        int(rng.choice(3, p=_GLASSES_PROBS)),
    )
    inherit = rng.random(4) < _TRAIT_INHERIT_PROB
    traits = [int(proto_traits[k, j]) if inherit[j] else fresh[j] for j in range(4)]
    has_mole = rng.random() < 0.3
    frame = _FRAME_COLOURS[int(rng.integers(len(_FRAME_COLOURS)))]
    return _decode_identity(genes, traits, has_mole, frame)


def _decode_identity(genes: np.ndarray, traits: Sequence[int], has_mole: bool, frame: tuple[int, int, int]) -> Identity:
    g = {name: float(genes[i]) for name, i in _G.items()}
    a = _lerp(0.25, 0.31, g["face_w"])
    b = _lerp(0.34, 0.41, g["face_h"])
    tone = g["skin_tone"] ** 1.3
    skin = _SKIN_LIGHT + (_SKIN_DARK - _SKIN_LIGHT) * tone + np.array([8.0, 0.0, -8.0]) * (g["skin_warmth"] - 0.5) * 2
    hair = _palette(_HAIR_PALETTE, g["hair_hue"]) * _lerp(0.7, 1.25, g["hair_shade"])
    eye_h = _lerp(0.017, 0.028, g["eye_h"])
    lips = skin * np.array([0.82, 0.6, 0.62]) + np.array([30.0, 0.0, 0.0]) * g["lip_colour"]
    mole = None
    if has_mole:
        mole = (_lerp(-0.7, 0.7, g["mole_x"]) * a, _lerp(-0.05, 0.22, g["mole_y"]))
    return Identity(
        a=a,
        b=b,
        jaw=_lerp(0.5, 0.85, g["jaw"]),
        chin_power=_lerp(0.55, 1.25, g["chin"]),
        skin=np.clip(skin, 0, 255),
        hair=np.clip(hair, 0, 255),
        hair_style=int(traits[0]),
        hair_margin=_lerp(0.012, 0.06, g["hair_volume"]),
        hairline=-b * _lerp(0.5, 0.72, g["hairline"]),
        parting=_lerp(-1.0, 1.0, g["parting"]),
        eye_dx=_lerp(0.12, 0.165, g["eye_dx"]),
        eye_y=_lerp(-0.085, -0.03, g["eye_y"]),
        eye_w=_lerp(0.042, 0.062, g["eye_w"]),
        eye_h=eye_h,
        eye_tilt=_lerp(-0.2, 0.2, g["eye_tilt"]),
        almond=bool(traits[1]),
        iris=_palette(_IRIS_PALETTE, g["iris_hue"]),
        iris_r=eye_h * _lerp(0.75, 1.05, g["iris_r"]),
        brow_thick=_lerp(0.007, 0.02, g["brow_thick"]),
        brow_arch=_lerp(0.0, 0.022, g["brow_arch"]),
        brow_tilt=_lerp(-0.018, 0.018, g["brow_tilt"]),
        brow_gap=_lerp(0.045, 0.075, g["brow_gap"]),
        brow_len=_lerp(1.05, 1.45, g["brow_len"]),
        nose_y=_lerp(0.075, 0.13, g["nose_y"]),
        nose_w=_lerp(0.028, 0.052, g["nose_w"]),
        nose_bridge=_lerp(0.3, 1.0, g["nose_bridge"]),
        mouth_y=_lerp(0.19, 0.25, g["mouth_y"]),
        mouth_w=_lerp(0.06, 0.095, g["mouth_w"]),
        lip_thick=_lerp(0.009, 0.024, g["lip_thick"]),
        lips=np.clip(lips, 0, 255),
        ear_size=_lerp(0.04, 0.065, g["ear_size"]),
        ear_y=_lerp(-0.02, 0.05, g["ear_y"]),
        beard=_BEARDS[int(traits[2])],
        glasses=int(traits[3]),
        frame=frame,
        mole=mole,
    )


@lru_cache(maxsize=None)
def _unit_circle(n: int, start: float = 0.0, stop: float = 2 * math.pi, closed: bool = False) -> np.ndarray:
    t = np.linspace(start, stop, n, endpoint=closed)
    unit = np.stack([np.cos(t), np.sin(t)], axis=1)
    unit.flags.writeable = False
    return unit


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 16, angle: float = 0.0) -> np.ndarray:
    pts = _unit_circle(n) * (rx, ry)
    if angle:
        c, s = math.cos(angle), math.sin(angle)
        pts = pts @ np.array([[c, s], [-s, c]])
    return pts + (cx, cy)


def _rgb(colour: np.ndarray | Sequence[float], factor: float = 1.0) -> tuple[int, int, int]:
    return tuple(int(min(255.0, max(0.0, c * factor))) for c in colour)


class _Sketch:
    """Shapes in face coordinates with per-point depth flags for the pseudo-3D pose model."""

    def __init__(self) -> None:
        self._points: list[np.ndarray] = []
        self._surface: list[np.ndarray] = []
        self._offset: list[np.ndarray] = []
        self.shapes: list[tuple[str, int, tuple[int, int, int], float]] = []

    def add(
        self,
        kind: str,
        pts: np.ndarray,
        colour: tuple[int, int, int],
        *,
        width: float = 0.0,
        surface: bool | np.ndarray = True,
        offset: float = 0.0,
    ) -> None:
        n = len(pts)
        self._points.append(np.asarray(pts, dtype=np.float64))
        self._surface.append(np.broadcast_to(np.asarray(surface, dtype=bool), (n,)))
        self._offset.append(np.full(n, offset))
        self.shapes.append((kind, n, colour, width))

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return np.concatenate(self._points), np.concatenate(self._surface), np.concatenate(self._offset)


@dataclass(frozen=True)
class _Pose:
    yaw: float
    pitch: float
    angle: float
    scale: float
    aspect: float
    cx: float
    cy: float


def _project(points: np.ndarray, surface: np.ndarray, offset: np.ndarray, face: Identity, pose: _Pose) -> np.ndarray:
    """Face coordinates -> image coordinates in [0, 1] (pseudo-3D yaw/pitch, then a similarity transform)."""
    x, y = points[:, 0], points[:, 1]
    depth = 0.8 * face.a * np.sqrt(np.clip(1.0 - (x / face.a) ** 2 - 0.25 * (y / face.b) ** 2, 0.04, None))
    z = np.where(surface, depth, 0.0) + offset
    xr = x * math.cos(pose.yaw) + z * math.sin(pose.yaw)
    yr = y * math.cos(pose.pitch) + 0.5 * z * math.sin(pose.pitch)
    c, s = math.cos(pose.angle), math.sin(pose.angle)
    sx, sy = pose.scale * pose.aspect, pose.scale / pose.aspect
    return np.stack([sx * (c * xr - s * yr) + pose.cx, sy * (s * xr + c * yr) + pose.cy], axis=1)


def _draw_hair_back(sk: _Sketch, f: Identity, hair: tuple[int, int, int], margin: float) -> None:
    if f.hair_style not in (2, 3, 4, 5):
        return
    bottom = {2: f.mouth_y + 0.02, 3: f.b + 0.25, 4: f.b * 0.55, 5: f.mouth_y}[f.hair_style]
    flare = 0.05 if f.hair_style == 3 else 0.025
    w = f.a + margin + 0.01
    top = _unit_circle(13, math.pi, 2 * math.pi, closed=True) * (w, f.b * 1.02 + margin + 0.01)
    sides = np.array([[w + flare, bottom], [0.6 * w, bottom + 0.03], [-0.6 * w, bottom + 0.03], [-w - flare, bottom]])
    sk.add("polygon", np.concatenate([top, sides]), hair, surface=False, offset=-0.1 * f.a)


def _draw_hair_front(sk: _Sketch, f: Identity, hair: tuple[int, int, int], margin: float) -> None:
    if f.hair_style == 0:
        for side in (-1, 1):
            patch = np.array([[side * f.a * 1.02, f.eye_y - 0.07], [side * f.a * 0.9, f.eye_y - 0.01]])
            patch = np.concatenate([patch, [[side * f.a * 0.99, f.ear_y], [side * f.a * 1.03, f.ear_y - 0.02]]])
            sk.add("polygon", patch, hair, surface=False)
        return
    side_y = f.eye_y - 0.045
    top_h = f.b * 1.02 + margin
    outer = _unit_circle(15, math.pi, 2 * math.pi, closed=True) * (f.a + margin, top_h) + (0, side_y * 0.3)
    u = np.linspace(0.0, math.pi, 11)
    hx = 0.95 * f.a * np.cos(u)
    if f.hair_style == 5:
        fringe = f.eye_y - f.brow_gap - 0.025
        hy = side_y + (fringe - side_y) * np.clip(np.sin(u) * 2.5, 0, 1)
    else:
        hy = side_y + (f.hairline - side_y) * np.sin(u) + 0.03 * f.parting * np.sin(2 * u)
    inner = np.stack([hx, hy], axis=1)
    surface = np.concatenate([np.zeros(len(outer), bool), np.ones(len(inner), bool)])
    sk.add("polygon", np.concatenate([outer, inner]), hair, surface=surface)
    if f.hair_style == 4:
        for p in _unit_circle(9, math.pi * 1.05, math.pi * 1.95, closed=True) * (f.a + margin, top_h):
            sk.add("polygon", _ellipse(p[0], p[1] + side_y * 0.3, 0.04, 0.04, 10), hair, surface=False)
    elif f.hair_style == 6:
        sk.add("polygon", _ellipse(0.0, -top_h + side_y * 0.3 - 0.03, 0.07, 0.055, 14), hair, surface=False)


def _draw_eye(sk: _Sketch, f: Identity, side: int, openness: float, gaze: tuple[float, float]) -> np.ndarray:
    cx, cy = side * f.eye_dx, f.eye_y
    tilt = -side * f.eye_tilt
    dark = _rgb(f.skin, 0.45)
    if openness < 0.2:
        lid = _ellipse(cx, cy, f.eye_w, f.eye_h * 0.25, 12, tilt)[:7]
        sk.add("line", lid, dark, width=0.006)
        return np.array([cx, cy])
    unit = _unit_circle(16) * (f.eye_w, f.eye_h * openness)
    if f.almond:
        unit[:, 1] *= 1.0 - 0.45 * np.abs(_unit_circle(16)[:, 0]) ** 2
    c, s = math.cos(tilt), math.sin(tilt)
    white = unit @ np.array([[c, s], [-s, c]]) + (cx, cy)
    sk.add("polygon", white, (238, 236, 230))
    ix, iy = cx + gaze[0] * f.eye_w, cy + gaze[1] * f.eye_h
    ry = min(f.iris_r, 0.95 * f.eye_h * openness)
    sk.add("polygon", _ellipse(ix, iy, f.iris_r, ry, 12), _rgb(f.iris))
    sk.add("polygon", _ellipse(ix, iy, 0.45 * f.iris_r, 0.45 * ry, 8), (15, 12, 12))
    sk.add("line", white[8:], dark, width=0.005)
    return np.array([cx, cy])


def _draw_brows(sk: _Sketch, f: Identity, raise_by: float, hair: np.ndarray) -> None:
    colour = _rgb(hair, 0.85)
    t = np.linspace(0.0, 1.0, 6)
    for side in (-1, 1):
        inner_x = side * (f.eye_dx - 0.75 * f.eye_w)
        xs = inner_x + side * t * f.eye_w * 2 * f.brow_len * 0.8
        base = f.eye_y - f.brow_gap - raise_by
        ys = base - (f.brow_arch + 0.5 * raise_by) * np.sin(t * math.pi * 0.85) - f.brow_tilt * t
        thick = f.brow_thick * (1.0 - 0.55 * t)
        upper = np.stack([xs, ys - thick / 2], axis=1)
        lower = np.stack([xs, ys + thick / 2], axis=1)[::-1]
        sk.add("polygon", np.concatenate([upper, lower]), colour)


def _draw_nose(sk: _Sketch, f: Identity) -> np.ndarray:
    shade = _rgb(f.skin, 0.78)
    w, y = f.nose_w, f.nose_y
    ridge = np.array([[0.12 * w, f.eye_y + 0.03], [0.3 * w, y - 0.35 * (y - f.eye_y)], [0.45 * w, y - 0.012]])
    sk.add("line", ridge, _rgb(f.skin, 0.88), width=0.006 * f.nose_bridge)
    base = np.array([[-w, y - 0.012], [-0.75 * w, y + 0.006], [0.0, y + 0.012], [0.75 * w, y + 0.006], [w, y - 0.012]])
    sk.add("line", base, shade, width=0.006, offset=0.1 * f.a)
    for side in (-1, 1):
        sk.add("polygon", _ellipse(side * 0.45 * w, y + 0.003, 0.22 * w, 0.009, 8), _rgb(f.skin, 0.5), offset=0.1 * f.a)
    return np.array([0.0, y])


def _draw_mouth(sk: _Sketch, f: Identity, smile: float, opening: float) -> np.ndarray:
    w = f.mouth_w * (1.0 + 0.12 * max(smile, 0.0))
    x = np.linspace(-w, w, 9)
    prof = 1.0 - (x / w) ** 2
    curve = 0.018 * smile
    line = f.mouth_y + curve * prof - 0.3 * curve
    upper_top = line - f.lip_thick * 0.8 * prof**0.6 * (1.0 - 0.3 * np.exp(-((x / (0.18 * w)) ** 2)))
    lower_line = line + opening * prof
    lower_bottom = lower_line + f.lip_thick * prof**0.6
    lips = _rgb(f.lips)
    if opening > 0:
        sk.add("polygon", np.concatenate([np.stack([x, line], 1), np.stack([x, lower_line], 1)[::-1]]), (45, 18, 20))
        teeth = np.concatenate([np.stack([x, line], 1), np.stack([x, line + 0.45 * opening * prof], 1)[::-1]])
        sk.add("polygon", teeth, (235, 232, 220))
    sk.add("polygon", np.concatenate([np.stack([x, upper_top], 1), np.stack([x, line], 1)[::-1]]), lips)
    sk.add("polygon", np.concatenate([np.stack([x, lower_line], 1), np.stack([x, lower_bottom], 1)[::-1]]), lips)
    sk.add("line", np.stack([x, line], 1), _rgb(f.lips, 0.55), width=0.004)
    return np.array([[-w, line[0]], [w, line[-1]]])


def _draw_beard(sk: _Sketch, f: Identity, colour: tuple[int, int, int], outline: np.ndarray) -> None:
    if f.beard == "none":
        return
    my, mw = f.mouth_y, f.mouth_w
    if f.beard in ("stubble", "full"):
        lower = outline[(outline[:, 1] > f.eye_y + 0.1)]
        lower = lower[np.argsort(np.arctan2(lower[:, 1], lower[:, 0]))]
        inner = np.array(
            [
                [-f.a * 0.8, f.eye_y + 0.12],
                [-mw - 0.03, my - 0.035],
                [0.0, my - f.lip_thick - 0.025],
                [mw + 0.03, my - 0.035],
                [f.a * 0.8, f.eye_y + 0.12],
            ]
        )
        sk.add("polygon", np.concatenate([lower, inner[::-1]]), colour)
    elif f.beard == "goatee":
        goatee = np.array(
            [[-0.7 * mw, my + 0.02], [0.7 * mw, my + 0.02], [0.5 * mw, f.b * 0.98], [-0.5 * mw, f.b * 0.98]]
        )
        sk.add("polygon", goatee, colour)
    if f.beard in ("goatee", "moustache"):
        top = my - f.lip_thick - 0.028
        moustache = np.array([[-mw - 0.01, my], [-0.2 * mw, top], [0.2 * mw, top], [mw + 0.01, my], [0.0, my - 0.012]])
        sk.add("polygon", moustache, colour)


def _draw_glasses(sk: _Sketch, f: Identity) -> None:
    r = f.eye_w * 1.45
    for side in (-1, 1):
        cx = side * f.eye_dx
        if f.glasses == 1:
            lens = _ellipse(cx, f.eye_y, r, r * 0.85, 16)
        else:
            lens = np.array([[-r, -0.7 * r], [r, -0.7 * r], [r, 0.75 * r], [-r, 0.75 * r]]) + (cx, f.eye_y)
        sk.add("line", np.concatenate([lens, lens[:1]]), f.frame, width=0.008, offset=0.04 * f.a)
    bridge = np.array([[-f.eye_dx + r, f.eye_y - 0.01], [0.0, f.eye_y - 0.018], [f.eye_dx - r, f.eye_y - 0.01]])
    sk.add("line", bridge, f.frame, width=0.007, offset=0.06 * f.a)


def _face_outline(f: Identity) -> np.ndarray:
    unit = _unit_circle(32)
    x, y = unit[:, 0] * f.a, unit[:, 1]
    lower = y > 0
    narrowing = 1.0 - (1.0 - f.jaw) * np.where(lower, y, 0.0) ** 2
    ys = np.where(lower, f.b * np.abs(y) ** f.chin_power, y * f.b * 1.05)
    return np.stack([x * narrowing, ys], axis=1)


def _sketch_face(f: Identity, rng: np.random.Generator, strength: float) -> tuple[_Sketch, np.ndarray]:
    """Draws one face with this image's expression and accessories; returns the sketch and the 5 landmarks."""
    cfg = NUISANCE
    smile = float(rng.uniform(-0.35, 1.0) * min(1.0, cfg.smile_max * strength))
    opening = float(rng.uniform(0.01, 0.035)) if rng.random() < cfg.mouth_open_prob * strength else 0.0
    raise_by = float(rng.uniform(0.006, 0.02)) if rng.random() < cfg.brow_raise_prob * strength else 0.0
    blink = rng.random() < cfg.blink_prob * strength
    openness = 0.0 if blink else float(rng.uniform(0.8, 1.15)) + 0.4 * raise_by / 0.02
    gaze = (float(rng.uniform(-1, 1)) * cfg.gaze_max * strength, float(rng.uniform(-0.2, 0.2)) * strength)
    margin = f.hair_margin * float(rng.uniform(0.85, 1.15))
    hair = _rgb(f.hair)
    skin = _rgb(f.skin)
    shirt = tuple(int(c) for c in rng.integers(20, 235, 3))

    sk = _Sketch()
    shoulders = np.array([[-0.55, 0.7], [-0.5, f.b + 0.13], [-0.2, f.b + 0.05], [0.2, f.b + 0.05], [0.5, f.b + 0.13]])
    sk.add("polygon", np.concatenate([shoulders, [[0.55, 0.7]]]), shirt, surface=False, offset=-0.2 * f.a)
    _draw_hair_back(sk, f, hair, margin)
    neck = np.array(
        [[-0.5 * f.a, 0.4 * f.b], [0.5 * f.a, 0.4 * f.b], [0.55 * f.a, f.b + 0.15], [-0.55 * f.a, f.b + 0.15]]
    )
    sk.add("polygon", neck, _rgb(f.skin, 0.85), surface=False, offset=-0.2 * f.a)
    for side in (-1, 1):
        ear = _ellipse(side * f.a * 0.97, f.ear_y, 0.45 * f.ear_size, f.ear_size, 12)
        sk.add("polygon", ear, _rgb(f.skin, 0.93), surface=False, offset=-0.25 * f.a)
    outline = _face_outline(f)
    sk.add("polygon", outline, skin, surface=False)
    beard_colour = _rgb(f.hair * 0.6 + f.skin * 0.4) if f.beard == "stubble" else _rgb(f.hair, 0.9)
    _draw_beard(sk, f, beard_colour, outline)
    if f.mole is not None:
        sk.add("polygon", _ellipse(f.mole[0], f.mole[1], 0.008, 0.008, 8), _rgb(f.skin, 0.4))
    mouth = _draw_mouth(sk, f, smile, opening)
    nose = _draw_nose(sk, f)
    eyes = [_draw_eye(sk, f, side, openness, gaze) for side in (-1, 1)]
    _draw_brows(sk, f, raise_by, f.hair)
    _draw_hair_front(sk, f, hair, margin)
    if f.glasses and rng.random() >= cfg.glasses_off_prob * strength:
        _draw_glasses(sk, f)
    if rng.random() < cfg.occlusion_prob * strength:
        _draw_occluder(sk, f, rng)
    return sk, np.stack([eyes[0], eyes[1], nose, mouth[0], mouth[1]])


def _draw_occluder(sk: _Sketch, f: Identity, rng: np.random.Generator) -> None:
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    cx, cy = float(rng.uniform(-f.a, f.a)), float(rng.uniform(-0.5 * f.b, f.b))
    rx, ry = float(rng.uniform(0.06, 0.2)), float(rng.uniform(0.05, 0.15))
    if rng.random() < 0.5:
        shape = _ellipse(cx, cy, rx, ry, 16, float(rng.uniform(0, math.pi)))
    else:
        shape = np.array([[-rx, -ry], [rx, -ry], [rx, ry], [-rx, ry]]) + (cx, cy)
    sk.add("polygon", shape, colour, surface=False, offset=f.a)


def _sample_pose(rng: np.random.Generator, strength: float) -> _Pose:
    cfg = NUISANCE
    return _Pose(
        yaw=math.radians(float(rng.uniform(-1, 1)) * cfg.yaw_max * strength),
        pitch=math.radians(float(rng.uniform(-1, 1)) * cfg.pitch_max * strength),
        angle=math.radians(
            float(np.clip(rng.normal(0, cfg.rotation_std * strength), -cfg.rotation_max, cfg.rotation_max))
        ),
        scale=cfg.scale_mean * math.exp(float(rng.normal(0, cfg.scale_log_std * strength))),
        aspect=math.exp(float(rng.normal(0, cfg.aspect_log_std * strength))),
        cx=0.5 + float(rng.normal(0, cfg.shift_std * strength)),
        cy=cfg.centre_y + float(rng.normal(0, cfg.shift_std * strength)),
    )


def _background(rng: np.random.Generator, side: int, strength: float) -> Image.Image:
    """Smooth random colour field (3x3 noise upsampled) plus a few random shapes."""
    amplitude = min(1.0, NUISANCE.background_contrast * strength)
    colours = 127.5 + (rng.uniform(0, 255, (3, 3, 3)) - 127.5) * amplitude
    grey = colours.mean(axis=2, keepdims=True)
    base = (grey + (colours - grey) * rng.uniform(0.2, 0.8)).astype(np.uint8)
    img = Image.fromarray(base, "RGB").resize((side, side), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(img)
    n_shapes = int(rng.integers(0, int(NUISANCE.clutter_max_shapes * min(strength, 2.0)) + 1))
    for _ in range(n_shapes):
        box = np.sort(rng.uniform(-0.1, 1.1, (2, 2)) * side, axis=0).ravel().tolist()
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = int(rng.integers(3))
        if kind == 0:
            draw.rectangle([box[0], box[1], box[2], box[3]], fill=colour)
        elif kind == 1:
            draw.ellipse([box[0], box[1], box[2], box[3]], fill=colour)
        else:
            draw.line([box[0], box[1], box[2], box[3]], fill=colour, width=int(rng.integers(2, max(3, side // 20))))
    return img


@lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    t = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    return t[None, :], t[:, None]


def render_face(
    identity: Identity, rng: np.random.Generator, size: int, strength: float = 1.0
) -> tuple[bytes, np.ndarray]:
    """Renders one image of an identity as JPEG bytes.

    Args:
        identity: decoded identity (from `make_identity`).
        rng: this image's generator; it fixes every nuisance.
        size: output side in pixels.
        strength: nuisance strength (1 = benchmark default, 0 = frontal, clean, neutral).

    Returns:
        (JPEG bytes, landmarks (5, 2) float in output pixel coordinates, pixel centres at integers: left eye,
        right eye, nose tip, left and right mouth corner).
    """
    cfg = NUISANCE
    side = 2 * size
    pose = _sample_pose(rng, strength)
    sketch, landmarks = _sketch_face(identity, rng, strength)
    img = _background(rng, side, strength)
    points, surface, offset = sketch.arrays()
    points = np.concatenate([points, landmarks])
    surface = np.concatenate([surface, np.ones(len(landmarks), bool)])
    offset = np.concatenate([offset, [0.0, 0.0, 0.1 * identity.a, 0.0, 0.0]])
    projected = _project(points, surface, offset, identity, pose)
    pixels = projected * side - 0.5
    draw = ImageDraw.Draw(img)
    line_scale = side * pose.scale
    start = 0
    for kind, n, colour, width in sketch.shapes:
        flat = pixels[start : start + n].ravel().tolist()
        start += n
        if kind == "polygon":
            draw.polygon(flat, fill=colour)
        else:
            draw.line(flat, fill=colour, width=max(1, round(width * line_scale)), joint="curve")
    img = img.reduce(2)
    if rng.random() < cfg.blur_prob * strength:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.25, 1.0)) * cfg.blur_max * strength * size / 112))
    arr = np.asarray(img, dtype=np.float32)
    gx, gy = _grid(size)
    phi = float(rng.uniform(0, 2 * math.pi))
    illum = 1.0 + float(rng.uniform(0, cfg.illumination_max * strength)) * (math.cos(phi) * gx + math.sin(phi) * gy)
    gains = np.exp(rng.normal(0, cfg.cast_log_std * strength, 3) + rng.normal(0, cfg.brightness_log_std * strength))
    contrast = math.exp(float(rng.normal(0, cfg.contrast_log_std * strength)))
    mean = arr.mean()
    arr = ((arr - mean) * contrast + mean) * illum[..., None] * gains.astype(np.float32)
    noise_sigma = float(rng.uniform(0, cfg.noise_max * strength))
    arr += rng.standard_normal(arr.shape, dtype=np.float32) * noise_sigma
    out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    quality = int(rng.integers(cfg.jpeg_quality_min, cfg.jpeg_quality_max + 1)) if strength > 0 else 95
    buffer = io.BytesIO()
    out.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue(), pixels[-len(landmarks) :] * 0.5 - 0.25
