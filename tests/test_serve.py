"""`fundus-sdk serve`: a real uvicorn on 127.0.0.1, driven by httpx, schemathesis and Chromium."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import fundus_sdk
from benchmarks.common import free_port
from fundus_sdk import Index
from tests.shared import FIXTURES, RETINA, eyepacs_sample, require

httpx = require("httpx", extra="dev")
require("fastapi", extra="serve")


class Server:
    """`fundus-sdk serve` in its own process, on loopback; its stderr (the audit log) in a file."""

    def __init__(self, index: Path, keys: Path, log: Path, *args: str) -> None:
        self.port, self.log = free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "fundus_sdk", "serve", str(index), "--keys", str(keys), "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stderr=log.open("w"), stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: {log.read_text()}")
            time.sleep(0.2)

    def stop(self) -> int:
        """SIGTERM, as a service manager stops it: 0 when it stopped cleanly (uvicorn ends by the
        signal it was given, after draining: -SIGTERM)."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        assert "Traceback" not in self.log.read_text(), self.log.read_text()[-3000:]
        return 0 if code == -signal.SIGTERM else code

    def audit(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]


def make_key(keys: Path, scope: str) -> str:
    out = subprocess.run([sys.executable, "-m", "fundus_sdk", "keys", "create", "--keys", str(keys), "--scope", scope],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return out.stdout.strip()


@pytest.fixture(scope="module")
def gallery(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("serve")
    photos = eyepacs_sample(2, split="train", per_grade=True)
    with Index.create(root / "cases") as ix:
        ix.add([p for p, _ in photos], [{"grade": g} for _, g in photos])
    keys = root / "keys.jsonl"
    return {"root": root, "index": root / "cases", "keys": keys, "search": make_key(keys, "search"),
            "admin": make_key(keys, "admin"), "photos": photos}  # fmt: skip


@pytest.fixture(scope="module")
def server(gallery):
    server = Server(gallery["index"], gallery["keys"], gallery["root"] / "server.log")
    yield server
    assert server.stop() == 0


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


CAT = FIXTURES / "chelsea.jpg"  # scikit-image's cat: no fundus photograph


def test_the_key_file_keeps_no_key_and_is_owner_only(gallery):
    text = gallery["keys"].read_text()
    assert gallery["search"] not in text and gallery["admin"] not in text and len(text.splitlines()) == 2
    assert gallery["keys"].stat().st_mode & 0o777 == 0o600


def test_health_is_open_and_everything_else_needs_a_key_of_its_scope(server, gallery):
    assert httpx.get(f"{server.url}/livez").status_code == 200
    ready = httpx.get(f"{server.url}/readyz").json()
    assert ready["status"] == "ready" and ready["index"]["cases"] == 10
    assert httpx.get(f"{server.url}/v1/index").status_code == 401
    assert httpx.get(f"{server.url}/v1/index", headers=auth("fsk_0000_nope")).status_code == 401
    assert httpx.get(f"{server.url}/metrics", headers=auth(gallery["search"])).status_code == 403
    assert httpx.get(f"{server.url}/v1/index", headers=auth(gallery["admin"])).status_code == 200


def test_search_by_photo_answers_with_hits_verdict_model_and_index(server, gallery):
    query, grade = eyepacs_sample(1, split="test")[0]
    r = httpx.post(f"{server.url}/v1/search", params={"k": 3, "where": "grade=0,1,2,3,4"}, headers=auth(gallery["search"]),
                   files={"image": (query.name, query.read_bytes(), "image/jpeg")}, timeout=60)  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["hits"]) == 3 and body["hits"][0]["score"] >= body["hits"][2]["score"]
    assert body["verdict"]["fundus"] and body["model"]["fingerprint"] == fundus_sdk.load_model().fingerprint
    assert body["index"] == {"generation": 1, "cases": 10}
    expected = fundus_sdk.search(query, gallery["index"], k=3)
    assert [h["key"] for h in body["hits"]] == [h.key for h in expected]  # the library's answer
    assert httpx.post(f"{server.url}/v1/search", params={"k": 101}, headers=auth(gallery["search"]),
                      files={"image": ("q.jpg", query.read_bytes())}).status_code == 422  # fmt: skip


def test_a_picture_that_is_not_a_fundus_photo_is_422_with_reasons_and_junk_is_400(server, gallery):
    r = httpx.post(f"{server.url}/v1/search", headers=auth(gallery["search"]), files={"image": ("cat.jpg", CAT.read_bytes())}, timeout=60)
    assert r.status_code == 422 and not r.json()["detail"]["verdict"]["fundus"] and r.json()["detail"]["verdict"]["reasons"]
    assert "cat.jpg" in r.json()["detail"]["error"]
    r = httpx.post(f"{server.url}/v1/search", headers=auth(gallery["search"]), files={"image": ("notes.jpg", b"not a photo")})
    assert r.status_code == 400 and "notes.jpg" in r.json()["detail"]
    r = httpx.post(f"{server.url}/v1/search", headers=auth(gallery["search"]), files={"image": ("q.jpg", RETINA.read_bytes())},
                   params={"where": "nosuchfield=1"})  # fmt: skip
    assert r.status_code == 400 and "nosuchfield" in r.json()["detail"]


def test_a_dicom_upload_is_searched_by_its_pixels(server, gallery, tmp_path):
    from tests.dicom_files import make_dicom, photo

    query = gallery["photos"][7][0]
    dicom = make_dicom(tmp_path / "IM0001", photo(query), syntax="jpeg2000")
    r = httpx.post(f"{server.url}/v1/search", params={"k": 1}, headers=auth(gallery["search"]),
                   files={"image": ("IM0001", dicom.read_bytes(), "application/dicom")}, timeout=60)  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["hits"][0]["key"] == 8 and r.json()["hits"][0]["score"] > 0.95


def test_a_batch_answers_each_photo_and_names_the_bad_one(server, gallery):
    files = [("images", ("retina.jpg", RETINA.read_bytes())), ("images", ("junk.jpg", b"junk"))]
    r = httpx.post(f"{server.url}/v1/search/batch", params={"k": 2}, headers=auth(gallery["search"]), files=files, timeout=60)
    assert r.status_code == 200, r.text
    first, second = r.json()["results"]
    assert first["query"] == "retina.jpg" and len(first["hits"]) == 2 and first["error"] is None
    assert second["query"] == "junk.jpg" and second["hits"] == [] and second["error"]
    many = [("images", (f"{i}.jpg", b"x")) for i in range(17)]
    assert httpx.post(f"{server.url}/v1/search/batch", headers=auth(gallery["search"]), files=many).status_code == 413


def test_search_by_descriptor_and_cases_by_cursor(server, gallery):
    vector = fundus_sdk.embed(gallery["photos"][3][0])[0]
    r = httpx.post(f"{server.url}/v1/search/vector", headers=auth(gallery["search"]), json={"vector": vector.tolist(), "k": 1})
    assert r.status_code == 200 and r.json()["hits"][0]["key"] == 4
    bad = httpx.post(f"{server.url}/v1/search/vector", headers=auth(gallery["search"]), json={"vector": [1.0, 0.0], "k": 1})
    assert bad.status_code == 400 and "dimension" in bad.json()["detail"]
    pages, after = [], 0
    while after is not None:
        page = httpx.get(f"{server.url}/v1/cases", params={"after": after, "limit": 4}, headers=auth(gallery["search"])).json()
        pages.append([c["key"] for c in page["cases"]])
        after = page["next"]
    assert pages == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]] or pages == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10], []]
    assert httpx.get(f"{server.url}/v1/cases/3", headers=auth(gallery["search"])).json()["grade"] == gallery["photos"][2][1]
    assert httpx.get(f"{server.url}/v1/cases/999", headers=auth(gallery["search"])).status_code == 404
    huge = 2**70  # beyond SQLite's integers: refused as input, never a server error (schemathesis found it)
    assert httpx.get(f"{server.url}/v1/cases/{huge}", headers=auth(gallery["search"])).status_code == 422
    assert httpx.get(f"{server.url}/v1/cases", params={"after": huge}, headers=auth(gallery["search"])).status_code == 422


def test_cases_another_process_adds_are_served_without_a_restart(server, gallery, tmp_path):
    new, grade = eyepacs_sample(1, split="test")[0]
    with Index.open(gallery["index"]) as ix:  # another process's writer, as `index add` or intake
        before = len(ix)
        (key,) = ix.add([new], [{"grade": grade}])
    try:
        r = httpx.post(f"{server.url}/v1/search", params={"k": 1}, headers=auth(gallery["search"]),
                       files={"image": ("q.jpg", new.read_bytes())}, timeout=60)  # fmt: skip
        assert r.json()["hits"][0]["key"] == key and r.json()["index"]["cases"] == before + 1
    finally:
        with Index.open(gallery["index"]) as ix:
            ix.remove([key])


def test_metrics_and_the_audit_log_account_for_each_request_without_identifiers(server, gallery):
    text = httpx.get(f"{server.url}/metrics", headers=auth(gallery["admin"])).text
    assert 'fundus_requests_total{endpoint="/v1/search",status="200"}' in text
    assert "fundus_index_generation" in text and 'fundus_stage_seconds_count{stage="query"}' in text
    lines = server.audit()
    searches = [a for a in lines if a["endpoint"] == "/v1/search" and a["status"] == 200]
    assert searches and all(a["key"] and len(a["cases"]) >= 1 for a in searches)
    assert {a["status"] for a in lines if a["endpoint"] == "/v1/index"} >= {200, 401}
    log = server.log.read_text()
    photo = gallery["photos"][0][0]
    assert str(photo) not in log and photo.name not in log and gallery["search"] not in log


def test_a_full_queue_is_503_with_retry_after_and_shutdown_drains_what_is_in_flight(gallery, tmp_path):
    server = Server(gallery["index"], gallery["keys"], tmp_path / "busy.log", "--threads", "1", "--queue", "0")
    files = [("images", (f"{i}.jpg", p.read_bytes())) for i, (p, _) in enumerate(gallery["photos"][:8])]

    def batch() -> httpx.Response:
        return httpx.post(f"{server.url}/v1/search/batch", headers=auth(gallery["search"]), files=files, timeout=120)

    with ThreadPoolExecutor(4) as pool:
        statuses = [r.status_code for r in pool.map(lambda _: batch(), range(4))]
    assert 503 in statuses and 200 in statuses and set(statuses) <= {200, 503}
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(batch)
        time.sleep(1.0)  # the request is being worked on
        assert server.stop() == 0
        assert in_flight.result().status_code == 200  # drained, not dropped


def test_two_workers_answer_alike_and_stop_together(gallery, tmp_path):
    server = Server(gallery["index"], gallery["keys"], tmp_path / "workers.log", "--workers", "2")
    query = gallery["photos"][6][0].read_bytes()

    def search(_) -> list[int]:
        r = httpx.post(f"{server.url}/v1/search", params={"k": 3}, headers=auth(gallery["search"]),
                       files={"image": ("q.jpg", query)}, timeout=120)  # fmt: skip
        return [h["key"] for h in r.raise_for_status().json()["hits"]]

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(search, range(6)))
    assert answers[0][0] == 7 and all(a == answers[0] for a in answers)
    assert server.stop() == 0


def test_every_endpoint_holds_to_its_openapi_schema(server, gallery, tmp_path):
    """schemathesis calls each operation (the HTML report's aside) with what the schema allows and
    more: no answer is a server error."""
    schema = httpx.get(f"{server.url}/openapi.json").json()
    assert {"/v1/search", "/v1/search/batch", "/v1/search/vector", "/v1/cases", "/v1/cases/{case_key}", "/v1/index"} <= set(schema["paths"])
    result = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/openapi.json", "--header",
         f"Authorization: Bearer {gallery['admin']}", "--checks", "not_a_server_error", "--max-examples", "8",
         "--exclude-path", "/v1/report"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "NO_COLOR": "1"}, cwd=tmp_path,  # its cache
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "Tested: 7" in result.stdout, result.stdout[-3000:]


@pytest.mark.slow
def test_the_page_at_the_root_searches_in_a_real_browser(server, gallery):
    from tests.browser import evaluate, page

    query = gallery["photos"][5][0]
    with page() as tools:
        tools.call("Page.navigate", url=f"{server.url}/")
        tools.wait_for("Page.loadEventFired")
        evaluate(tools, f"document.getElementById('key').value = {json.dumps(gallery['search'])}")
        root = tools.call("DOM.getDocument")["root"]["nodeId"]
        node = tools.call("DOM.querySelector", nodeId=root, selector="#image")["nodeId"]
        tools.call("DOM.setFileInputFiles", nodeId=node, files=[str(query)])
        evaluate(tools, "document.getElementById('go').click()")
        deadline = time.monotonic() + 90
        while not evaluate(tools, "document.getElementById('report').style.display === 'block'"):
            assert time.monotonic() < deadline, evaluate(tools, "document.getElementById('status').textContent")
            time.sleep(0.5)
        report = evaluate(tools, "document.getElementById('report').srcdoc")
    assert "a retrieval aid, not a diagnostic device" in report.lower() and report.count("<img") >= 6


def test_keys_create_refuses_an_unknown_scope(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fundus_sdk", "keys", "create", "--keys", str(tmp_path / "k"), "--scope", "root"],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 2 and "root" in out.stderr and not (tmp_path / "k").exists()


def test_unit_vectors_only(server, gallery):
    r = httpx.post(f"{server.url}/v1/search/vector", headers=auth(gallery["search"]), json={"vector": (np.ones(512) * 5).tolist()})
    assert r.status_code == 400 and "unit" in r.json()["detail"]
