"""The public surface reads well: every public member documented, useful reprs, open-or-create."""

from __future__ import annotations

import inspect
import logging
import subprocess
import sys

import fundus_sdk
from tests.shared import FIXTURES, RETINA, eyepacs_sample


def public_members() -> list[tuple[str, object]]:
    members = []
    for name in fundus_sdk.__all__:
        obj = getattr(fundus_sdk, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        members.append((name, obj))
        if inspect.isclass(obj):
            for attr, value in vars(obj).items():
                target = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
                if not attr.startswith("_") and (callable(target) or isinstance(value, property)):
                    members.append((f"{name}.{attr}", target))
    return members


def test_every_public_member_has_a_docstring():
    members = public_members()
    assert len(members) > 60  # the walk really reaches the methods
    assert [name for name, obj in members if not inspect.getdoc(obj)] == []


def test_reprs_say_what_a_thing_is(tmp_path):
    model = fundus_sdk.load_model()
    assert repr(model).startswith(f"<Model {model.name}: dim {model.dim}")
    with fundus_sdk.Index.create(tmp_path / "ix", model=model) as ix:
        ix.add([RETINA], [{"grade": 0}])
        assert repr(ix) == f"<Index {str(tmp_path / 'ix')!r}: 1 cases, {model.name}, read-write>"
        hit = ix.search(RETINA, k=1)[0]
        assert repr(hit) == f"Hit(key={hit.key}, score={hit.score:.3f}, grade=0, path={str(RETINA.resolve())!r})"


def test_open_or_create_runs_twice(tmp_path):
    for expected in (0, 1):
        with fundus_sdk.Index.open_or_create(tmp_path / "ix") as ix:
            assert len(ix) == expected
            ix.add([RETINA])


def test_library_code_logs_instead_of_printing(tmp_path, caplog, capsys):
    caplog.set_level(logging.INFO, logger="fundus_sdk")
    model = fundus_sdk.Model.load(fundus_sdk.model.default_model_path())
    with fundus_sdk.Index.create(tmp_path / "ix", model=model) as ix:
        ix.add([RETINA, FIXTURES / "chelsea.jpg"], on_error=lambda err: None)
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("fundus_sdk")]
    assert any(m.startswith("loaded model ") and model.fingerprint[:12] in m for m in messages), messages
    assert any("created index" in m for m in messages) and any("1 of 2 inputs added" in m for m in messages), messages
    assert capsys.readouterr() == ("", "")


def test_creating_an_index_says_nothing_on_stderr(tmp_path):
    """Without logging configured, Python prints warnings of loggers to stderr: a new index has none."""
    code = f"import fundus_sdk\nfundus_sdk.Index.create({str(tmp_path / 'ix')!r}).close()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stderr == ""


def test_query_answers_each_photo_with_its_verdict_hits_or_error(tmp_path):
    with fundus_sdk.Index.create(tmp_path / "ix") as ix:
        ix.add([RETINA, eyepacs_sample(1, split="train")[0][0]], [{"grade": 0}, {"grade": 1}])
    junk = tmp_path / "notes.jpg"
    junk.write_text("not a photo")
    errors = []
    results = fundus_sdk.query([RETINA, FIXTURES / "chelsea.jpg", junk], tmp_path / "ix", k=2, on_error=errors.append)
    good, cat, bad = results
    assert good.ok and good.verdict.fundus and [h.grade for h in good.hits][0] == 0 and good.generation == 1
    assert not cat.ok and isinstance(cat.error, fundus_sdk.NotFundusError) and not cat.verdict.fundus and cat.hits == []
    assert not bad.ok and bad.verdict is None and str(junk) in str(bad.error) and bad.query == str(junk)
    assert sorted(errors, key=str) == sorted([cat.error, bad.error], key=str)  # each handed to on_error once
    assert good.to_dict()["hits"][0]["key"] == good.hits[0].key and cat.to_dict()["error"] == cat.error.reason
    try:
        fundus_sdk.query([junk], tmp_path / "ix")
    except fundus_sdk.ImageError as err:
        assert str(junk) in str(err)
    else:
        raise AssertionError("on_error='raise' is the default")
