"""The input gate: is this a colour fundus photograph, and is it gradable?

A retrieval aid always has neighbours to show; the gate says when they mean nothing. It judges
each input from signals the embedding computes anyway, for well under 5% of its cost
(benchmarks/input_gate.py):

- typicality: the Mahalanobis distance of the model's descriptor from the descriptors of its
  training photos (raw-camera versions of them included). The model was trained on fundus
  photographs only, so a cat, a document or an X-ray lands far from all of them;
- colour: the mean saturation inside the field of view (greyscale pictures have none);
- surround: how much of the crop's corners the field of view covers. A fundus camera frames its
  round field of view on black, so the corners of its bounding box are dark (99.9% of the
  EyePACS photos leave at least 27% of them dark); a picture that fills the frame does not;
- structure: the green channel's detail at vessel scale (a 3 px mean against a 9 px mean, at
  ~128 px) over its detail at pixel scale. A photograph of anatomy has far more of the former
  (the 6,720 EyePACS photos: 0.1% quantile 0.41, median 0.87); noise has little (0.10), and a
  tinted noise disc on black can otherwise sit among the photos' descriptors;
- sharpness ceiling: the mean absolute Laplacian over the grey levels' spread (the focus signal)
  above any fundus photograph's, as in noise, print or a star field: a photograph of the retina
  through the eye's optics has no such pixel-scale detail;
- gradability: the field of view is large enough (at least half the model's input size), has
  grey levels to work with (not underexposed), is not washed out (clipped), and is in focus.

Every limit is a quantile of calibration photos' own values, not a number tuned on a picture:
export/gate.py fits the descriptor distribution on training photos and sets the limits on photos
the model never learnt from (the validation split, as published and as raw-camera copies), and
stores the result in the model file as `gate.calibration`. A model without a calibration gets a
verdict of None.
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from typing import Any

import numpy as np

from .errors import ImageError
from .inputs import describe

CALIBRATION_KEY = "gate.calibration"
CLIP_LEVEL = 250


@dataclass(frozen=True)
class Signals:
    """What the preprocessing measured of one photo, for the gate."""

    colour: float  # mean (max - min) / max over the channels, inside the field of view
    surround: float  # fraction of the crop's corners (outside the inscribed disc) inside the field of view
    focus: float  # mean absolute Laplacian over the standard deviation, inside the field of view
    range: float  # 99th percentile of the brightest channel inside the field of view (0-255)
    clipped: float  # fraction of field-of-view pixels at CLIP_LEVEL or above in every channel
    fov_side: int  # shorter side of the field of view's box, in decoded pixels
    structure: float  # green detail at vessel scale over detail at pixel scale, inside the field of view


@lru_cache(maxsize=4)
def _corners(side: int) -> np.ndarray:
    """The pixels of a side x side square outside its inscribed disc."""
    yy, xx = np.mgrid[-1 : 1 : side * 1j, -1 : 1 : side * 1j]
    return (xx**2 + yy**2) > 1


def _sums3(a: np.ndarray) -> np.ndarray:
    """Sums of three neighbours along the second-last axis (two shorter)."""
    return a[..., :-2, :] + a[..., 1:-1, :] + a[..., 2:, :]


def _window_sums(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sums of (n, h, w) `x` over 3x3 and 9x9 windows, zero outside: a 9-sum is three 3-sums 3 apart."""
    n, h, w = x.shape
    padded = np.zeros((n, h + 8, w + 8), x.dtype)
    padded[:, 4:-4, 4:-4] = x
    rows3 = _sums3(padded)  # centred on rows -3 .. h+2
    rows9, rows3 = rows3[:, :-6] + rows3[:, 3:-3] + rows3[:, 6:], rows3[:, 3:-3]
    cols3 = _sums3(rows3.swapaxes(1, 2)).swapaxes(1, 2)[:, :, 3:-3]
    cols = _sums3(rows9.swapaxes(1, 2)).swapaxes(1, 2)
    return cols3, cols[:, :, :-6] + cols[:, :, 3:-3] + cols[:, :, 6:]


def _structure(green: np.ndarray, inside: np.ndarray) -> float:
    """Energy of (3 px mean - 9 px mean) over energy of (pixel - 3 px mean), inside the field of view.

    The means count field-of-view pixels only (sums of the masked channel over sums of the mask).
    """
    w = inside.astype(np.float32)
    g = green * w  # float32 sums of 8-bit values over 81 pixels are exact
    sums3, sums9 = _window_sums(np.stack([g, w]))
    fine = sums3[0] / np.maximum(sums3[1], 1e-6)
    vessel = (fine - sums9[0] / np.maximum(sums9[1], 1e-6))[inside]
    pixel = (g - fine)[inside]
    return float(np.dot(vessel, vessel) / max(float(np.dot(pixel, pixel)), 1e-6))


def measure(square: np.ndarray, mask: np.ndarray, box: tuple[int, int, int, int], work: int = 128) -> Signals:
    """The gate's signals of a photo from its resized field-of-view crop and mask (sampled at ~`work` px)."""
    step = max(1, square.shape[0] // work)
    small, inside = square[::step, ::step], mask[::step, ::step]
    if not inside.any():
        return Signals(0.0, 0.0, 0.0, 0.0, 0.0, 0, 0.0)
    r, g, b = (small[:, :, c] for c in range(3))
    top = np.maximum(np.maximum(r, g), b)[inside].astype(np.float32)
    bottom = np.minimum(np.minimum(r, g), b)[inside]
    grey = (r.astype(np.float32) + g + b) / 3  # sums of three 8-bit values are exact in any order
    lap = np.abs(4 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:])
    inner = inside[1:-1, 1:-1]
    q = int(0.99 * (top.size - 1))
    return Signals(
        colour=float((top.mean() - bottom.mean()) / max(1.0, float(top.mean()))),
        surround=float(inside[_corners(inside.shape[0])].mean()),
        focus=float(lap[inner].mean() / max(1.0, float(grey[inside].std()))) if inner.any() else 0.0,
        range=float(np.partition(top, q)[q]),
        clipped=float(np.mean(bottom >= CLIP_LEVEL)),
        fov_side=int(min(box[2] - box[0], box[3] - box[1])),
        structure=_structure(g, inside),
    )


@dataclass(frozen=True)
class Verdict:
    """The gate's judgement of one input: scores in [0, 1] (0.5 at the limit) and reasons."""

    fundus: bool
    fundus_score: float
    gradable: bool
    gradability: float
    reasons: tuple[str, ...] = ()

    @property
    def accepted(self) -> bool:
        """A colour fundus photograph (gradable or not): what an index takes by default."""
        return self.fundus

    def summary(self) -> str:
        """One line for people: what it is and why."""
        what = "fundus photograph" if self.fundus else "not a fundus photograph"
        if self.fundus and not self.gradable:
            what += ", ungradable"
        return what + (f": {'; '.join(self.reasons)}" if self.reasons else "")

    def to_dict(self) -> dict[str, Any]:
        """The verdict as plain JSON-ready values."""
        return {**asdict(self), "reasons": list(self.reasons)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Verdict":
        """The verdict `to_dict` wrote (embedding files carry them)."""
        return cls(**{**values, "reasons": tuple(values["reasons"])})


class NotFundusError(ImageError):
    """The input gate judged an input not to be a colour fundus photograph."""

    def __init__(self, source: object, verdict: Verdict) -> None:
        self.verdict = verdict
        super().__init__(describe(source), verdict.summary())


def refusal(source: object, verdict: Verdict | None) -> NotFundusError | None:
    """The gate's rule, in one place: an input whose verdict is not accepted (`Verdict.accepted`)
    is refused with this error; None when it is accepted or was not checked."""
    return None if verdict is None or verdict.accepted else NotFundusError(source, verdict)


class UngradableWarning(UserWarning):
    """A query is a fundus photograph the gate judged ungradable: its neighbours mean less."""


def _score(excess: float, span: float) -> float:
    """1 at the typical value, 0.5 at the limit, towards 0 beyond it."""
    return float(0.5 ** (max(0.0, excess) / max(span, 1e-9)))


def _pack(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype="<f4").tobytes()).decode("ascii")


def _unpack(s: str, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype="<f4").astype(np.float64).reshape(shape)


@dataclass(frozen=True)
class Gate:
    """A model's calibrated gate: the descriptor distribution and each signal's accepted band."""

    mean: np.ndarray  # (dim,)
    basis: np.ndarray  # (k, dim) principal directions of the calibration descriptors
    variances: np.ndarray  # (k,) their variances (shrunk)
    residual: float  # variance per dimension of everything outside the basis
    limits: dict[str, float]  # distance, colour, surround, range, clipped, focus, focus_high, structure
    typical: dict[str, float]  # the calibration photos' medians of the same
    photos: int  # how many photos the calibration saw

    def distance(self, vectors: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each descriptor from the calibration photos'."""
        centred = np.atleast_2d(vectors).astype(np.float64) - self.mean
        proj = centred @ self.basis.T
        rest = np.maximum((centred**2).sum(axis=1) - (proj**2).sum(axis=1), 0.0)
        return np.sqrt((proj**2 / self.variances).sum(axis=1) + rest / self.residual)

    def judge(self, vector: np.ndarray, signals: Signals, min_side: int) -> Verdict:
        """The verdict on one input from its descriptor and signals; `min_side`: smallest field of view."""
        lim, typ = self.limits, self.typical
        d = float(self.distance(vector)[0])
        tests = [  # (excess over the typical value, span from typical to limit, reason when past the limit)
            (d - typ["distance"], lim["distance"] - typ["distance"],
             f"unlike the model's fundus photographs (distance {d:.1f}; limit {lim['distance']:.1f})"),
            (typ["colour"] - signals.colour, typ["colour"] - lim["colour"],
             f"no colour (saturation {signals.colour:.2f}; fundus photographs >= {lim['colour']:.2f})"),
            (signals.surround - typ["surround"], lim["surround"] - typ["surround"],
             f"no dark surround (the picture fills {signals.surround:.0%} of its corners; fundus photographs "
             f"<= {lim['surround']:.0%})"),
        ]  # fmt: skip
        if "structure" in lim:  # calibrations before 0.3 did not measure it
            tests.append((typ["structure"] - signals.structure, typ["structure"] - lim["structure"],
                          f"no vessel-scale structure, as in noise (structure {signals.structure:.2f}; fundus "
                          f"photographs >= {lim['structure']:.2f})"))  # fmt: skip
        if "focus_high" in lim:  # nor this ceiling
            tests.append((signals.focus - typ["focus"], lim["focus_high"] - typ["focus"],
                          f"pixel-scale detail beyond a fundus photograph's, as in noise, print or a star field "
                          f"(sharpness {signals.focus:.2f}; fundus photographs <= {lim['focus_high']:.2f})"))  # fmt: skip
        reasons = [reason for excess, span, reason in tests if excess > span]
        fundus = not reasons
        fundus_score = min(_score(excess, span) for excess, span, _ in tests)
        checks = [  # (shortfall below the limit's side, span from typical to limit, reason)
            (min_side - signals.fov_side, min_side / 2, f"field of view {signals.fov_side} px across (< {min_side})"),
            (lim["range"] - signals.range, typ["range"] - lim["range"], f"underexposed (brightest level {signals.range:.0f})"),
            (signals.clipped - lim["clipped"], max(lim["clipped"] - typ["clipped"], 1e-3),
             f"overexposed ({signals.clipped:.0%} of the field of view clipped)"),
            (lim["focus"] - signals.focus, typ["focus"] - lim["focus"], f"out of focus (sharpness {signals.focus:.2f})"),
        ]  # fmt: skip
        gradability = 1.0
        for shortfall, span, reason in checks:
            gradability = min(gradability, _score(shortfall + span, span))
            if shortfall > 0:
                reasons.append(reason)
        gradable = fundus and not any(shortfall > 0 for shortfall, _, _ in checks)
        return Verdict(fundus, round(fundus_score, 4), gradable, round(gradability, 4), tuple(reasons))

    def to_json(self) -> str:
        """The calibration as the text stored in a model's metadata (arrays as base64 float32)."""
        return json.dumps({
            "dim": int(self.mean.size), "k": int(self.variances.size), "mean": _pack(self.mean),
            "basis": _pack(self.basis), "variances": _pack(self.variances), "residual": self.residual,
            "limits": self.limits, "typical": self.typical, "photos": self.photos,
        })  # fmt: skip

    @classmethod
    def from_json(cls, text: str) -> "Gate":
        """The calibration stored by `to_json`."""
        d = json.loads(text)
        dim, k = int(d["dim"]), int(d["k"])
        return cls(
            _unpack(d["mean"], (dim,)), _unpack(d["basis"], (k, dim)), _unpack(d["variances"], (k,)),
            float(d["residual"]), dict(d["limits"]), dict(d["typical"]), int(d["photos"]),
        )  # fmt: skip


def calibrate(
    fit: np.ndarray,
    held: np.ndarray,
    signals: list[Signals],
    kinds: np.ndarray | None = None,
    *,
    k: int = 64,
    shrink: float = 0.1,
    q: float = 0.001,
) -> Gate:
    """A gate whose descriptor distribution is fitted on `fit` and whose limits are set on `held`.

    `held` (descriptors, with their `signals`) should be photos the model never learnt from: a
    network recognises its own training photos, which sit closer to the distribution than any new
    photo, so limits set on them refuse new fundus photographs. Each limit is the `q` (or 1 - q)
    quantile of the held photos' values, widened by a margin for the bands, so a photo like them is
    refused about `q` of the time per signal. `kinds` labels each held row's kind of photo (e.g. 0
    as published, 1 a raw-camera copy): a limit is then the most lenient of the kinds' own
    quantiles, so that every kind, not just the most numerous, is refused about `q` of the time.
    """
    fit, held = np.asarray(fit, dtype=np.float64), np.asarray(held, dtype=np.float64)
    kinds = np.zeros(len(held), dtype=int) if kinds is None else np.asarray(kinds)
    mean = fit.mean(axis=0)
    cov = np.cov((fit - mean).T)
    cov = (1 - shrink) * cov + shrink * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])
    values, vecs = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1]
    k = min(k, len(values) - 1)  # at least one direction left for the residual
    residual = float(values[order[k:]].mean())
    gate = Gate(mean, vecs[:, order[:k]].T, values[order[:k]], residual, {}, {}, len(fit) + len(held))

    def low(v: np.ndarray) -> float:  # the lowest of the kinds' q quantiles
        return float(min(np.quantile(v[kinds == kind], q) for kind in np.unique(kinds)))

    def high(v: np.ndarray) -> float:  # the highest of the kinds' 1 - q quantiles
        return float(max(np.quantile(v[kinds == kind], 1 - q) for kind in np.unique(kinds)))

    names = ("colour", "surround", "range", "clipped", "focus", "structure")
    sig = {"distance": gate.distance(held), **{name: np.array([getattr(s, name) for s in signals]) for name in names}}
    limits = {
        "distance": high(sig["distance"]),
        "colour": 0.6 * low(sig["colour"]),
        "surround": high(sig["surround"]),
        "range": 0.6 * low(sig["range"]),
        "clipped": min(1.0, 2 * high(sig["clipped"]) + 0.02),
        "focus": 0.6 * low(sig["focus"]),
        "focus_high": high(sig["focus"]) / 0.6,
        "structure": 0.6 * low(sig["structure"]),
    }
    typical = {name: float(np.median(v)) for name, v in sig.items()}
    return replace(gate, limits=limits, typical=typical)
