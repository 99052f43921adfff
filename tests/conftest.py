"""Fixtures more than one test module needs."""
import pathlib

import pytest


@pytest.fixture
def unwritable_folder(tmp_path: pathlib.Path) -> pathlib.Path:
    """A folder this process cannot create a file in: a read-only one, or /sys where root runs."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    for candidate in (folder, pathlib.Path("/sys")):
        try:
            (candidate / "probe.pt").open("ab").close()
        except OSError:
            return candidate
        (candidate / "probe.pt").unlink()
    pytest.skip("no folder here refuses a new file")
