"""A retrieval model: one ONNX file, run with ONNX Runtime, preprocessing rebuilt from its metadata."""

from __future__ import annotations

import json
import logging
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import cached_property, lru_cache
from importlib import resources
from itertools import islice
from pathlib import Path
from typing import Any, Union

import numpy as np
import onnxruntime as ort

from . import contract
from .errors import ImageError, ModelError, OnError, ProviderError, error_policy
from .explain import Explanation
from .gate import CALIBRATION_KEY, Gate, Signals, Verdict
from .inputs import Decoded, ImageInput
from .labels import ICDR, Scale
from .preprocess import Prepared, Preprocess
from .weights import WeightsError, fingerprints

log = logging.getLogger(__name__)
ort.disable_telemetry_events()  # a hospital's photos and usage stay on its machines (Windows builds send ETW events)
OUTPUTS = ([contract.OUTPUT_NAME], [contract.OUTPUT_NAME, contract.ATTENTION_NAME])  # what a model may output
DEFAULT_MODEL = "default.onnx"
# Images per ONNX Runtime call. Its CPU arena keeps the peak of the images in flight at once:
# `index add` of 200 photos at the default batch of 16 peaked at 1.1 GB with one call per batch,
# at 370 MB with calls of 2, in the same time (benchmarks/add_memory.py). `iter_embed` runs
# several batches at once and splits this between them. Batches stay 16 everywhere else
# (decoding ahead, gate, commits).
RUN_CHUNK = 2
MODEL_LICENCE = "LICENSE-MODEL.txt"  # the bundled weights' terms, beside them in the package


# ONNX Runtime's threads busy-wait after each operator unless told not to; several processes
# embedding at once on the same cores then burn each other's time. Sleeping instead: two processes
# together 1.36x faster, one alone 7% slower (benchmarks/concurrent_embed.py).
SPIN_WAIT = False


def default_model_path() -> Path:
    """Path of the model bundled with the package."""
    return Path(str(resources.files("fundus_sdk") / "models" / DEFAULT_MODEL))


Provider = Union[str, tuple[str, dict[str, Any]]]  # a name, or ONNX Runtime's (name, options) form
Providers = Union[Sequence[Provider], str, None]


def resolve_providers(providers: Providers) -> list[Provider]:
    """ONNX Runtime providers to ask for: CUDA first when this build has it, else the CPU.

    `providers` may be None (automatic), "cpu", "cuda", or a list of ONNX Runtime provider
    names or (name, options) pairs, e.g. [("CUDAExecutionProvider", {"device_id": 1})]. Asking
    for CUDA where this onnxruntime build has no CUDA provider is an error.
    """
    available = ort.get_available_providers()
    if providers is None:
        wanted = ["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []
        return wanted + ["CPUExecutionProvider"]
    if isinstance(providers, str):
        providers = [providers]
    aliases = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
    resolved: list[Provider] = []
    for p in providers:
        if isinstance(p, str):
            resolved.append(aliases.get(p.lower(), p))
        elif isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], dict):
            resolved.append((aliases.get(p[0].lower(), p[0]), p[1]))
        else:
            raise ProviderError(f"a provider is a name or a (name, options dict) pair, got {p!r}")
    for name in map(provider_name, resolved):
        if name not in available:
            hint = (
                " Install the GPU build instead of the CPU one (never both side by side): "
                "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu "
                "(see GPU in the README)."
                if name == "CUDAExecutionProvider"
                else ""
            )
            raise ProviderError(
                f"{name} is not available in this onnxruntime build (available: {', '.join(available)}).{hint}"
            )
    return resolved


def provider_name(provider: Provider) -> str:
    return provider if isinstance(provider, str) else provider[0]


@dataclass
class Model:
    """A loaded retrieval model. Use `load_model()` to get one."""

    path: Path
    session: ort.InferenceSession = field(repr=False)
    metadata: dict[str, str] = field(repr=False)
    preprocess: Preprocess = field(repr=False)
    identity: str = field(repr=False)  # the whole fingerprint, computed from the file at load

    @classmethod
    def load(cls, path: str | Path, providers: Providers = None, threads: int | None = None) -> "Model":
        """Load a model file without the cache of `load_model` (ModelError: not a usable model).

        `threads`: ONNX Runtime's intra-op threads (None: its default, every core); give each of
        several processes embedding at once its share of the cores.
        """
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"{path}: model file not found")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        wanted = resolve_providers(providers)
        options = ort.SessionOptions()
        if not SPIN_WAIT:
            for pool in ("intra_op", "inter_op"):
                options.add_session_config_entry(f"session.{pool}.allow_spinning", "0")
        if threads is not None:
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                session = ort.InferenceSession(str(path), sess_options=options, providers=wanted)
        except Exception as exc:  # onnxruntime raises its own, untyped, exceptions
            raise ModelError(f"{path}: not a loadable ONNX model ({exc})") from exc
        if "CUDAExecutionProvider" in map(provider_name, wanted) and providers is not None and (
            "CUDAExecutionProvider" not in session.get_providers()
        ):
            raise ProviderError(
                "CUDAExecutionProvider is installed but could not start (no GPU visible, or the CUDA/cuDNN "
                "libraries that onnxruntime-gpu needs are missing); use providers='cpu'"
            )
        meta = dict(session.get_modelmeta().custom_metadata_map)
        missing = [k for k in contract.REQUIRED if k not in meta]
        if missing:
            raise ModelError(f"{path}: not a fundus-sdk model (metadata lacks {', '.join(missing)})")
        names = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
        if names[0] != [contract.INPUT_NAME] or names[1] not in OUTPUTS:
            raise ModelError(
                f"{path}: expected input {contract.INPUT_NAME!r} and output {contract.OUTPUT_NAME!r} "
                f"(optionally {contract.ATTENTION_NAME!r}), got {names}"
            )
        try:
            preprocess = Preprocess.from_metadata(meta)
        except (KeyError, ValueError) as exc:
            raise ModelError(f"{path}: cannot rebuild preprocessing from metadata ({exc})") from exc
        identity = check_graph(path, session, meta, preprocess)
        log.info("loaded model %s %s (%s) from %s on %s", meta[contract.NAME], meta[contract.VERSION],
                 identity[:12], path, ", ".join(session.get_providers()))  # fmt: skip
        model = cls(path, session, meta, preprocess, identity)
        try:
            model.scale
        except ValueError as exc:
            raise ModelError(f"{path}: metadata {contract.SCALE!r}: {exc}") from exc
        return model

    def __repr__(self) -> str:
        return f"<Model {self.name}: dim {self.dim}, input {self.preprocess.size} px, {', '.join(self.providers)}>"

    @property
    def dim(self) -> int:
        """Length of the descriptors."""
        return int(self.metadata[contract.DIM])

    @property
    def fingerprint(self) -> str:
        """sha256 of what decides the model's results: weights, graph, preprocessing and input-gate
        calibration (fundus_sdk.weights). Indexes record it and refuse other models' vectors."""
        return self.identity

    @property
    def weights_fingerprint(self) -> str:
        """sha256 of the weights and preprocessing alone (the metadata's, checked at load): what
        indexes and embedding files made before 0.4 recorded."""
        return self.metadata[contract.FINGERPRINT]

    @property
    def name(self) -> str:
        """Name and version, e.g. "fundus-lite0-mirror 0.2.0"."""
        return f"{self.metadata[contract.NAME]} {self.metadata[contract.VERSION]}"

    @cached_property
    def scale(self) -> Scale:
        """The grading scale the model was trained on (ICDR 0-4 unless its metadata says otherwise)."""
        return Scale.parse(self.metadata.get(contract.SCALE, ICDR.spec))

    @property
    def providers(self) -> list[str]:
        """The ONNX Runtime execution providers the session runs on."""
        return self.session.get_providers()

    @property
    def explains(self) -> bool:
        """Whether the graph also outputs the mirror-attention map (see `explain`)."""
        return contract.ATTENTION_NAME in (o.name for o in self.session.get_outputs())

    def metrics(self) -> dict:
        """The evaluation metrics recorded in the model (empty if none)."""
        return json.loads(self.metadata.get(contract.METRICS, "{}") or "{}")

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Descriptors for a preprocessed uint8 (n, size, size, 3) batch."""
        return self._outputs([contract.OUTPUT_NAME], batch)[0]

    def _outputs(self, names: list[str], batch: np.ndarray, chunk: int | None = None) -> list[np.ndarray]:
        """The graph's `names` outputs for a batch, run `chunk` (default RUN_CHUNK) images at a time."""
        step = chunk or RUN_CHUNK
        runs = [self.session.run(names, {contract.INPUT_NAME: batch[i : i + step]}) for i in range(0, len(batch), step)]
        return [np.concatenate([r[j] for r in runs]) for j in range(len(names))] if runs else [
            np.zeros((0, *o.shape[1:]), np.float32) for o in self.session.get_outputs() if o.name in names
        ]

    @cached_property
    def gate(self) -> Gate | None:
        """The input gate calibrated for this model (None: the model file carries none)."""
        text = self.metadata.get(CALIBRATION_KEY)
        return Gate.from_json(text) if text else None

    def judge(self, vector: np.ndarray, signals: Signals) -> Verdict | None:
        """The input gate's verdict on one embedded photo (None: the model carries no gate)."""
        return self.gate.judge(vector, signals, self.preprocess.size // 2) if self.gate else None

    def iter_embed(
        self, images: Iterable[ImageInput], *, batch_size: int = 16, workers: int = 2, check: bool = True
    ) -> Iterator[Batch]:
        """Embed in batches, each a `Batch` of vectors, identities, gate verdicts and errors.

        Each of `workers` threads decodes, preprocesses and embeds a whole batch, so decoding
        overlaps inference and ONNX Runtime runs several batches at once, which keeps the cores
        busier than one run at a time (benchmarks/cli_throughput.py). Batches come back in input
        order, at most `workers` ahead of the one being yielded. Images that fail yield an
        ImageError instead of a vector. With `check` (and a calibrated model) each vector comes
        with the input gate's Verdict, else None.
        """
        source, workers = iter(images), max(1, workers)
        # On the CPU the images in ONNX Runtime at once stay RUN_CHUNK (its arena is the process's
        # memory); a GPU keeps calls of RUN_CHUNK, as before the batches ran together.
        on_cpu = self.providers[0] == "CPUExecutionProvider"
        chunk = max(1, RUN_CHUNK // workers) if on_cpu else RUN_CHUNK
        with ThreadPoolExecutor(max_workers=workers) as pool:
            pending: deque[Future[Batch]] = deque()
            start = 0
            try:
                while items := list(islice(source, batch_size)):
                    pending.append(pool.submit(self._embed_batch, start, items, check, chunk))
                    start += len(items)
                    if len(pending) > workers:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:  # the caller stopped early: drop the batches not started
                for future in pending:
                    future.cancel()

    def _embed_batch(self, start: int, items: list[ImageInput], check: bool, chunk: int) -> Batch:
        """One `iter_embed` batch: `items` are the inputs from position `start` on."""
        loaded: list[tuple[Prepared, Decoded] | ImageError] = []
        for item in items:
            try:
                prepared, decoded = self.preprocess.load(item)
            except ImageError as exc:
                loaded.append(exc)
                continue
            # the decoded photo (up to ~90 MP) is dropped at once: a batch holds only model-sized pixels
            loaded.append((prepared, replace(decoded, image=None)))
        ok = [(start + i, r) for i, r in enumerate(loaded) if not isinstance(r, ImageError)]
        pixels = np.stack([r[0].pixels for _, r in ok]) if ok else np.zeros((0, self.preprocess.size, self.preprocess.size, 3), np.uint8)
        vectors = self._outputs([contract.OUTPUT_NAME], pixels, chunk)[0]
        return Batch(
            [i for i, _ in ok], vectors, [r[1].sha256 for _, r in ok],
            [self.judge(v, r[0].signals) if check else None for v, (_, r) in zip(vectors, ok)],
            [r for r in loaded if isinstance(r, ImageError)],
            [r[1].metadata for _, r in ok], [r[1].identifiers for _, r in ok],
            [start + i for i, r in enumerate(loaded) if isinstance(r, ImageError)],
        )  # fmt: skip

    def embed(
        self, images: ImageInput | Sequence[ImageInput], *, batch_size: int = 16, on_error: OnError = "raise"
    ) -> np.ndarray:
        """float32 (n, dim) unit-norm descriptors, one row per input, in input order.

        on_error: "raise" (default) raises the first ImageError; "skip" leaves that row NaN and
        warns; a callable receives each ImageError and the row stays NaN. The input gate is not
        applied: see `check`.
        """
        failed = error_policy(on_error)
        items = as_list(images)
        out = np.full((len(items), self.dim), np.nan, dtype=np.float32)
        for batch in self.iter_embed(items, batch_size=batch_size, check=False):
            for err in batch.errors:
                failed(err)
            out[batch.positions] = batch.vectors
        return out

    def explain(self, images: ImageInput | Sequence[ImageInput], *, batch_size: int = 16) -> list[Explanation]:
        """Each input's descriptor, input-gate verdict and mirror-attention heatmap on its photo.

        For showing why cases were retrieved (fundus_sdk.report). ModelError if the model has no
        attention output (`explains`); an input that cannot be read raises its ImageError.
        """
        if not self.explains:
            raise ModelError(
                f"{self.path}: this model has no attention output; add it with `python -m export.explain {self.path}`"
            )
        items = as_list(images)
        out: list[Explanation] = []
        for start in range(0, len(items), batch_size):
            loaded = [self.preprocess.load(item) for item in items[start : start + batch_size]]
            vectors, maps = self._outputs(
                [contract.OUTPUT_NAME, contract.ATTENTION_NAME], np.stack([p.pixels for p, _ in loaded])
            )
            for (prepared, decoded), vector, attention in zip(loaded, vectors, maps):
                verdict = self.judge(vector, prepared.signals)
                out.append(Explanation(decoded.name, vector, attention, prepared.fov, prepared.box, decoded.image, verdict, decoded.sha256))
        return out

    def check(
        self, images: ImageInput | Sequence[ImageInput], *, batch_size: int = 16, on_error: OnError = "raise"
    ) -> list[Verdict | None]:
        """The input gate's verdict on each input (is it a gradable colour fundus photograph?).

        One entry per input, in order; None for an input that failed to decode (with
        on_error="skip" or a callable). ModelError if this model carries no gate calibration.
        """
        if self.gate is None:
            raise ModelError(f"{self.path}: this model carries no input-gate calibration (python -m export gate)")
        failed = error_policy(on_error)
        items = as_list(images)
        out: list[Verdict | None] = [None] * len(items)
        for batch in self.iter_embed(items, batch_size=batch_size):
            for err in batch.errors:
                failed(err)
            for i, verdict in zip(batch.positions, batch.verdicts):
                out[i] = verdict
        return out


@dataclass(frozen=True)
class Batch:
    """One batch from `Model.iter_embed`: what was embedded, and what failed."""

    positions: list[int]  # where each vector's input was in the inputs given
    vectors: np.ndarray  # float32 (len(positions), dim), unit rows
    sha256: list[str]  # the identity of each embedded input (fundus_sdk.inputs)
    verdicts: list[Verdict | None]  # the input gate's, per vector (None: not checked)
    errors: list[ImageError]  # the inputs of this batch that failed
    metadata: list[dict[str, Any]]  # what each input's header says (DICOM; else empty)
    identifiers: list[dict[str, str]]  # who each input's patient is (DICOM; else empty): never stored unasked
    failed: list[int]  # where each error's input was in the inputs given


def check_graph(path: Path, session: ort.InferenceSession, meta: dict[str, str], preprocess: Preprocess) -> str:
    """The model's whole fingerprint (fundus_sdk.weights), after a ModelError unless the metadata
    tells the truth about the graph: its weights' fingerprint (computed from the file), its
    descriptor dimension and its input size."""
    try:
        actual, whole = fingerprints(path, meta)
    except (WeightsError, OSError) as exc:
        raise ModelError(f"{path}: cannot read the model's weights to fingerprint them ({exc})") from exc
    if actual != meta[contract.FINGERPRINT]:
        raise ModelError(
            f"{path}: the weights do not match the fingerprint in the metadata ({actual[:12]} vs "
            f"{meta[contract.FINGERPRINT][:12]}): the file was changed after export, or its metadata copied from another model"
        )
    (shape_in,), shape_out = [i.shape for i in session.get_inputs()], session.get_outputs()[0].shape
    size, dim = int(meta[contract.INPUT_SIZE]), int(meta[contract.DIM])
    if shape_out[-1] != dim:
        raise ModelError(f"{path}: the metadata says dimension {dim}, the graph outputs {shape_out[-1]}")
    if list(shape_in[1:]) != [size, size, 3] or preprocess.size != size:
        raise ModelError(
            f"{path}: the metadata says input {size} px (preprocessing {preprocess.size} px), the graph takes {shape_in[1:]}"
        )
    return whole


def as_list(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    """One input or a sequence of inputs, as a list (an HxWx3 array is one image, NxHxWx3 is N)."""
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    if isinstance(images, Sequence) and not isinstance(images, (str, bytes, bytearray)):
        return list(images)
    return [images]


@lru_cache(maxsize=8)
def _cached(path: str, providers: str | None, threads: int | None) -> Model:
    listed = None if providers is None else [p if isinstance(p, str) else tuple(p) for p in json.loads(providers)]
    return Model.load(path, listed, threads)


def load_model(path: str | Path | None = None, providers: Providers = None, threads: int | None = None) -> Model:
    """Load a model file (None: the bundled default). Loaded models are cached per path,
    providers and threads. See `Model.load`."""
    target = Path(path) if path is not None else default_model_path()
    if path is None and not target.is_file():
        raise ModelError(f"the bundled default model is missing from this installation ({target})")
    listed = [providers] if isinstance(providers, str) else providers
    key = None if listed is None else json.dumps([p if isinstance(p, str) else list(p) for p in listed], sort_keys=True)
    return _cached(str(target.resolve()), key, threads)


def embed(
    images: ImageInput | Sequence[ImageInput],
    *,
    model: Model | str | Path | None = None,
    batch_size: int = 16,
    providers: Providers = None,
    threads: int | None = None,
    on_error: OnError = "raise",
) -> np.ndarray:
    """Embed fundus images (paths, PIL images, HxWx3 uint8 arrays, or a mix) as unit-norm rows.

    `model=None` uses the bundled default model. See `Model.embed` for `on_error`.
    """
    m = model if isinstance(model, Model) else load_model(model, providers, threads)
    return m.embed(images, batch_size=batch_size, on_error=on_error)
