"""The public surface reads well: every public member documented, useful reprs, open-or-create."""

from __future__ import annotations

import inspect

import fundus_sdk
from tests.shared import RETINA


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
