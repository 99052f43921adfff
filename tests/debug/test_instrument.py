"""DumpInstrument through the pass manager, and dump_pipeline (what `fxopt dump` runs)."""
import re
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import fxopt
from fxopt import Pass, PassError, PassResult, register_pass, unregister_pass
from fxopt.debug import DumpInstrument, dump_pipeline


def model():
    return nn.Sequential(nn.Linear(8, 8), nn.Dropout(), nn.ReLU(), nn.Identity(), nn.Linear(8, 4))


INPUTS = (torch.randn(2, 8),)


def test_steps_diffs_and_index_in_order(tmp_path):
    inst = DumpInstrument(tmp_path)
    fxopt.optimize(model(), INPUTS, "remove-noops,fold-constants,dce", instruments=[inst], verify_each=True)

    stems = ["00-captured", "01-remove-noops", "02-fold-constants", "03-dce"]
    assert [s.stem for s in inst.steps] == stems
    for stem in stems:
        assert (tmp_path / f"{stem}.txt").read_text().startswith(f"# {stem}")
        assert (tmp_path / f"{stem}.dot").exists()
    assert not (tmp_path / "00-captured.diff").exists()

    diff = (tmp_path / "01-remove-noops.diff").read_text()
    assert diff.startswith("--- 00-captured.txt\n+++ 01-remove-noops.txt\n")
    assert "-%_1 = call_module 1(%_0)  : f32[2, 8]" in diff  # the dropout went
    assert "-%_3 = call_module 3(%_2)  : f32[2, 8]" in diff  # and the identity
    assert (tmp_path / "03-dce.diff").read_text() == "# unchanged\n"

    html = (tmp_path / "index.html").read_text()
    links = re.findall(r'href="(\d\d-[\w.-]+\.txt)"', html)
    assert links == [f"{s}.txt" for s in stems]  # every step, in order
    assert 'href="01-remove-noops.diff">+2 -4</a>' in html
    assert "7 &rarr; 5" in html and "remove-noops" in html
    assert html.count("PASS (exact, cpu)") == 3  # the verification of each pass


def test_skipped_passes_are_listed(tmp_path):
    inst = DumpInstrument(tmp_path, svg=False)
    fxopt.optimize(model(), INPUTS, "remove-noops,dce", instruments=[inst], bisect_limit=1)
    assert [s.stem for s in inst.steps] == ["00-captured", "01-remove-noops"]
    assert "skipped (bisect limit)" in (tmp_path / "index.html").read_text()


@dataclass
class Explode(Pass):
    """A pass that always fails, to test the index a failed pipeline leaves."""

    name = "explode-for-dump-test"

    def run(self, gm, ctx) -> PassResult:
        raise RuntimeError("boom")


@pytest.fixture
def explode():
    register_pass(Explode)
    yield
    unregister_pass(Explode.name)


def test_dump_pipeline_returns_the_index(tmp_path):
    index = dump_pipeline(model(), INPUTS, "remove-noops,dce", tmp_path / "d", mode="symbolic")
    assert index == tmp_path / "d" / "index.html"
    html = index.read_text()
    assert "front end: symbolic" in html and "(final check)" in html
    assert html.count("PASS (exact, cpu)") == 3  # two passes plus the final check
    assert (tmp_path / "d" / "02-dce.txt").exists()


def test_failed_pipeline_still_leaves_an_index(tmp_path, explode):
    with pytest.raises(PassError) as info:
        dump_pipeline(model(), INPUTS, "remove-noops,explode-for-dump-test", tmp_path)
    assert info.value.dump_index == tmp_path / "index.html"
    html = info.value.dump_index.read_text()
    assert "FAIL:" in html and "boom" in html
    assert "01-remove-noops.txt" in html and "failed: no graph after this pass" in html
