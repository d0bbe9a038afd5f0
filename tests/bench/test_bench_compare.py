"""``nimbus bench compare`` with tiny settings: both servers ran every run, each from its own
checkout. Behaviour only, never speed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from nimbus import __version__
from nimbus.bench.compare import bench_compare, checkout_src, this_src
from nimbus.exceptions import UserError


def test_each_side_runs_every_run_on_its_own_checkout(tmp_path: Path) -> None:
    # "another checkout": a copy of this one, marked, so its server can be told apart
    other = tmp_path / "other" / "src"
    shutil.copytree(this_src() / "nimbus", other / "nimbus")
    init = other / "nimbus" / "__init__.py"
    init.write_text(init.read_text().replace('__version__ = "', '__version__ = "0.0.0+base-'))
    # enough runs that each server's CPU spans several clock ticks (what /proc counts in)
    base, this = bench_compare(
        tmp_path / "other", runs=30, database="sqlite", mode="wait", latency_ms=0, turns=2
    )
    assert (base.name, base.src, this.name, this.src) == ("base", other, "this", this_src())
    for side in (base, this):
        assert (len(side.added_s), side.errors) == (30, []), side
        assert side.cpu_s > 0 and side.cpu_ms_per_run > 0
        assert 0 < side.added_ms(0.5) <= side.added_ms(0.99)
    assert base.version.startswith("0.0.0+base-") and this.version == __version__


def test_a_folder_without_nimbus_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="holds no Nimbus sources"):
        checkout_src(tmp_path)
    assert checkout_src(this_src().parent) == checkout_src(this_src()) == this_src()
