"""`fundus-sdk serve`: search a case index over HTTP, for hospital software that is not Python
(the `serve` extra: FastAPI and uvicorn).

Each worker process opens the model and the index once, read-only (fundus_sdk.reader: searches
share it from any thread and see what other processes commit without a restart). At most
`threads` requests per worker are worked on at once, at most `queue` more wait; beyond that a
request is answered 503 with Retry-After at once, never left hanging. Every request is counted
in /metrics and written as one line of the audit log (key id, endpoint, status, case keys
returned; never patient identifiers or image bytes). Keys: fundus_sdk.keys.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi import Path as FastPath
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from . import __version__, contract
from .errors import FundusError, ImageError
from .filters import INT64, FilterError, conditions_to_where
from .gate import NotFundusError
from .index import Index
from .keys import Key, authenticate, read_keys
from .pipeline import QueryResult
from .report import Report

MAX_K, MAX_BATCH, MAX_UPLOAD = 100, 16, 64 * 1024 * 1024
CONFIG_ENV = "FUNDUS_SDK_SERVE"  # how workers started by uvicorn find their configuration
audit = logging.getLogger("fundus_sdk.audit")


@dataclass(frozen=True)
class ServeConfig:
    """What a worker serves and how: the index, the key file, the model (None: the index's
    default), requests worked on at once (`threads`), requests allowed to wait (`queue`), and
    ONNX Runtime's threads (None: the cores shared among the workers)."""

    index: str
    keys: str
    model: str | None = None
    threads: int = 2
    queue: int = 16
    onnx_threads: int | None = None


class Metrics:
    """Counters and latency sums for /metrics, in Prometheus' text format (no client library)."""

    BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.refusals: dict[str, int] = defaultdict(int)
        self.latency: dict[str, list[float]] = {}  # stage -> [count per bucket..., +Inf count, sum]

    def count(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def refused(self, why: str) -> None:
        with self._lock:
            self.refusals[why] += 1

    def observe(self, stage: str, seconds: float) -> None:
        with self._lock:
            row = self.latency.setdefault(stage, [0.0] * (len(self.BUCKETS) + 2))
            for i, bound in enumerate(self.BUCKETS):
                row[i] += seconds <= bound
            row[-2] += 1
            row[-1] += seconds

    def render(self, gauges: dict[str, float]) -> str:
        lines = ["# TYPE fundus_requests_total counter"]
        with self._lock:
            lines += [f'fundus_requests_total{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in sorted(self.requests.items())]
            lines.append("# TYPE fundus_refusals_total counter")
            lines += [f'fundus_refusals_total{{reason="{why}"}} {n}' for why, n in sorted(self.refusals.items())]
            lines.append("# TYPE fundus_stage_seconds histogram")
            for stage, row in sorted(self.latency.items()):
                lines += [f'fundus_stage_seconds_bucket{{stage="{stage}",le="{b}"}} {int(c)}' for b, c in zip(self.BUCKETS, row)]
                lines += [f'fundus_stage_seconds_bucket{{stage="{stage}",le="+Inf"}} {int(row[-2])}',
                          f'fundus_stage_seconds_count{{stage="{stage}"}} {int(row[-2])}',
                          f'fundus_stage_seconds_sum{{stage="{stage}"}} {row[-1]:.6f}']  # fmt: skip
        for name, value in gauges.items():
            lines += [f"# TYPE fundus_{name} gauge", f"fundus_{name} {value}"]
        return "\n".join(lines) + "\n"


class VectorQuery(BaseModel):
    """A search by descriptor: a unit vector of the index's model."""

    vector: list[float]
    k: int = Field(10, ge=1, le=MAX_K)
    where: dict[str, Any] | None = None
    exclude: dict[str, Any] | None = None


class Service:
    """One worker's model, index, keys, admission control and metrics."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = config.onnx_threads or cores
        self.index = Index.open(config.index, read_only=True, model=config.model, threads=threads)
        self.model = self.index.model  # loaded and checked against the index now, not at the first request
        self._keys: tuple[float, list[Key]] = (-1.0, [])
        self.metrics = Metrics()
        self.working = asyncio.Semaphore(config.threads)
        self.pending = 0  # requests admitted: working or waiting

    def keys(self) -> list[Key]:
        """The key file's keys, read again when it changes (a key created while serving works at once)."""
        path = Path(self.config.keys)
        mtime = path.stat().st_mtime if path.exists() else 0.0
        if mtime != self._keys[0]:
            self._keys = (mtime, read_keys(path))
        return self._keys[1]

    @asynccontextmanager
    async def admitted(self) -> AsyncIterator[None]:
        """A place to work, or 503 at once when `threads` are busy and `queue` are waiting."""
        if self.pending >= self.config.threads + self.config.queue:
            self.metrics.refused("busy")
            raise HTTPException(503, "the service is busy: try again shortly", headers={"Retry-After": "1"})
        self.pending += 1
        try:
            async with self.working:
                yield
        finally:
            self.pending -= 1

    def model_info(self) -> dict[str, str]:
        return {"name": self.model.name, "version": self.model.metadata.get(contract.VERSION, ""), "fingerprint": self.model.fingerprint}

    def index_info(self) -> dict[str, int]:
        return {"generation": self.index.generation, "cases": len(self.index)}

    def gauges(self) -> dict[str, float]:
        return {"queue_depth": max(0, self.pending - self.config.threads), "requests_in_flight": self.pending,
                "index_generation": self.index.generation, "index_cases": len(self.index)}  # fmt: skip


def filters(where: list[str], exclude: list[str]) -> tuple[dict | None, dict | None]:
    """The CLI's --where/--exclude conditions from query parameters; 400 when one is malformed."""
    try:
        return conditions_to_where(tuple(where)) or None, conditions_to_where(tuple(exclude)) or None
    except FilterError as exc:
        raise HTTPException(400, str(exc)) from None


async def upload(file: UploadFile) -> bytes:
    data = await file.read(MAX_UPLOAD + 1)
    if len(data) > MAX_UPLOAD:
        raise HTTPException(413, f"{file.filename}: larger than {MAX_UPLOAD // 2**20} MiB")
    if not data:
        raise HTTPException(400, f"{file.filename}: the upload is empty")
    return data


def failure(result: QueryResult, name: str) -> HTTPException:
    """422 for a picture the gate refuses (with its reasons), 400 for one that cannot be read."""
    err = result.error
    if isinstance(err, NotFundusError):
        return HTTPException(422, {"error": f"{name}: {err.reason}", "verdict": err.verdict.to_dict()})
    return HTTPException(400, f"{name}: {err.reason if isinstance(err, ImageError) else err}")


def create_app(config: ServeConfig) -> FastAPI:
    """The service's FastAPI app for `config` (uvicorn runs it; tests may too)."""
    service: Service | None = None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal service
        service = await run_in_threadpool(Service, config)
        yield
        service.index.close()

    app = FastAPI(title="fundus-sdk", version=__version__, lifespan=lifespan,
                  description="Similar graded fundus photographs, by photograph or descriptor.")  # fmt: skip

    def live() -> Service:
        if service is None:
            raise HTTPException(503, "starting")
        return service

    def require(scope: str):
        def check(request: Request, svc: Service = Depends(live)) -> Key:
            header = request.headers.get("authorization", "")
            if not header.lower().startswith("bearer "):
                raise HTTPException(401, "an API key is needed: Authorization: Bearer KEY", headers={"WWW-Authenticate": "Bearer"})
            key = authenticate(svc.keys(), header[7:].strip())
            if key is None:
                raise HTTPException(401, "unknown API key", headers={"WWW-Authenticate": "Bearer"})
            request.state.key_id = key.id
            if not key.allows(scope):
                raise HTTPException(403, f"this key's scope is {key.scope}; {scope} is needed")
            return key

        return check

    @app.middleware("http")
    async def account(request: Request, call_next):
        started = time.perf_counter()
        request.state.case_keys = []
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            endpoint = getattr(route, "path", "unmatched")
            if service is not None:
                service.metrics.count(endpoint, status)
                service.metrics.observe("request", time.perf_counter() - started)
            audit.info(json.dumps({"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "key": getattr(request.state, "key_id", None),
                                   "method": request.method, "endpoint": endpoint, "status": status,
                                   "cases": request.state.case_keys}))  # fmt: skip

    async def run_queries(svc: Service, request: Request, images: list[tuple[str, bytes]], k: int, where, exclude) -> list[QueryResult]:
        async with svc.admitted():
            started = time.perf_counter()
            try:
                results = await run_in_threadpool(svc.index.query, [data for _, data in images], k, where, exclude,
                                                  True, lambda err: None)  # fmt: skip
            except (FilterError, ValueError) as exc:  # a field no case has, a value of the wrong kind
                raise HTTPException(400, str(exc)) from None
            svc.metrics.observe("query", time.perf_counter() - started)
        for (name, _), r in zip(images, results):
            r.query = name
            if isinstance(r.error, NotFundusError):
                svc.metrics.refused("not a fundus photograph")
            request.state.case_keys += [h.key for h in r.hits]
        return results

    @app.post("/v1/search", summary="The most similar cases for one photograph (JPEG, PNG, TIFF, WebP or DICOM)")
    async def search(request: Request, image: UploadFile = File(...), k: int = Query(10, ge=1, le=MAX_K),
                     where: list[str] = Query([]), exclude: list[str] = Query([]), key: Key = Depends(require("search"))):  # fmt: skip
        svc = live()
        name = image.filename or "upload"
        (result,) = await run_queries(svc, request, [(name, await upload(image))], k, *filters(where, exclude))
        if not result.ok:
            raise failure(result, name)
        return {"hits": [h.to_dict() for h in result.hits], "verdict": result.verdict.to_dict() if result.verdict else None,
                "model": svc.model_info(), "index": {"generation": result.generation, "cases": len(svc.index)}}  # fmt: skip

    @app.post("/v1/search/batch", summary=f"The most similar cases for up to {MAX_BATCH} photographs")
    async def search_batch(request: Request, images: list[UploadFile] = File(...), k: int = Query(10, ge=1, le=MAX_K),
                           where: list[str] = Query([]), exclude: list[str] = Query([]), key: Key = Depends(require("search"))):  # fmt: skip
        svc = live()
        if len(images) > MAX_BATCH:
            raise HTTPException(413, f"at most {MAX_BATCH} images per batch, got {len(images)}")
        files = [(f.filename or f"upload-{i + 1}", await upload(f)) for i, f in enumerate(images)]
        results = await run_queries(svc, request, files, k, *filters(where, exclude))
        return {"results": [r.to_dict() for r in results], "model": svc.model_info(), "index": svc.index_info()}

    @app.post("/v1/search/vector", summary="The most similar cases for a descriptor of the index's model")
    async def search_vector(request: Request, body: VectorQuery, key: Key = Depends(require("search"))):
        svc = live()
        async with svc.admitted():
            try:
                vector = np.asarray([body.vector], np.float32)
                hits = await run_in_threadpool(svc.index.search_batch, vector, body.k, body.where, body.exclude)
            except (FundusError, ValueError) as exc:
                raise HTTPException(400, str(exc)) from None
        request.state.case_keys = [h.key for h in hits[0]]
        return {"hits": [h.to_dict() for h in hits[0]], "model": svc.model_info(), "index": svc.index_info()}

    @app.get("/v1/cases/{case_key}", summary="One case by its key")
    async def case(request: Request, case_key: int = FastPath(ge=1, le=INT64[1]), key: Key = Depends(require("search"))):
        try:
            found = await run_in_threadpool(live().index.get, case_key)
        except KeyError:
            raise HTTPException(404, f"no case {case_key}") from None
        request.state.case_keys = [found.key]
        return found.to_dict()

    @app.get("/v1/cases", summary="Cases by key, a page at a time: pass the last key of a page as `after`")
    async def cases(request: Request, after: int = Query(0, ge=0, le=INT64[1]), limit: int = Query(100, ge=1, le=1000),
                    key: Key = Depends(require("search"))):  # fmt: skip
        page = await run_in_threadpool(live().index.cases, None, None, after=after, limit=limit)
        request.state.case_keys = [c.key for c in page]
        return {"cases": [c.to_dict() for c in page], "next": page[-1].key if len(page) == limit else None}

    @app.get("/v1/index", summary="What the index holds: size, model, settings")
    async def index_info(key: Key = Depends(require("search"))):
        svc = live()
        info = await run_in_threadpool(svc.index.info)
        return {"cases": info["cases"], "grades": info["grades"], "generation": svc.index.generation, "model": svc.model_info(),
                "settings": asdict(svc.index.settings), "scale": info.get("scale"), "dim": svc.index.dim}  # fmt: skip

    @app.post("/v1/report", response_class=HTMLResponse, summary="The visual report of one photograph (as `search --html`)")
    async def report(request: Request, image: UploadFile = File(...), k: int = Query(10, ge=1, le=MAX_K),
                     key: Key = Depends(require("search"))):  # fmt: skip
        svc = live()
        name = image.filename or "upload"
        data = await upload(image)
        (result,) = await run_queries(svc, request, [(name, data)], k, None, None)
        if not result.ok:
            raise failure(result, name)
        async with svc.admitted():
            return HTMLResponse(await run_in_threadpool(lambda: Report.build(svc.index, [(data, result.hits)]).to_html()))

    @app.get("/livez", include_in_schema=False)
    async def livez():
        return {"status": "alive"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz():
        if service is None:
            return JSONResponse({"status": "starting"}, 503)
        return {"status": "ready", "index": service.index_info()}

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    async def metrics(key: Key = Depends(require("admin"))):
        svc = live()
        return PlainTextResponse(svc.metrics.render(svc.gauges()))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(PAGE, headers={"Content-Security-Policy": PAGE_POLICY})

    return app


def app_from_environment() -> FastAPI:
    """The app for a worker uvicorn starts (`--workers` > 1): its configuration in CONFIG_ENV."""
    return create_app(ServeConfig(**json.loads(os.environ[CONFIG_ENV])))


PAGE_POLICY = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; frame-src 'self' blob:; connect-src 'self'; form-action 'none'"
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fundus-sdk</title>
<style>body{font:15px system-ui,sans-serif;margin:2em;max-width:1200px}label{display:block;margin:.6em 0}
#report{width:100%;height:80vh;border:1px solid #ccc;display:none}#status{color:#a00}</style></head>
<body><h1>Similar graded cases</h1>
<p>Upload a fundus photograph to see the most similar graded cases of this index, with heatmaps.
A retrieval aid, not a diagnostic device.</p>
<form id="form"><label>API key <input id="key" type="password" size="50" autocomplete="off" required></label>
<label>Photograph <input id="image" type="file" accept="image/*,application/dicom,.dcm" required></label>
<label>Cases <input id="k" type="number" value="10" min="1" max="100"></label>
<button id="go" type="submit">Search</button></form>
<p id="status" role="status"></p>
<iframe id="report" title="report" sandbox="allow-same-origin"></iframe>
<script>
document.getElementById("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const status = document.getElementById("status"), frame = document.getElementById("report");
  status.textContent = "searching...";
  const body = new FormData();
  body.append("image", document.getElementById("image").files[0]);
  const k = document.getElementById("k").value;
  const response = await fetch("/v1/report?k=" + encodeURIComponent(k), {method: "POST", body,
    headers: {"Authorization": "Bearer " + document.getElementById("key").value}});
  if (!response.ok) {
    const problem = await response.json().catch(() => ({detail: response.statusText}));
    const detail = problem.detail && problem.detail.error ? problem.detail.error : problem.detail;
    status.textContent = response.status + ": " + (typeof detail === "string" ? detail : JSON.stringify(detail));
    frame.style.display = "none";
    return;
  }
  status.textContent = "";
  frame.srcdoc = await response.text();
  frame.style.display = "block";
});
</script></body></html>
"""
