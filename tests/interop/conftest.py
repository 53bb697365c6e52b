import pathlib
import sys

import pytest

# tests/ has no __init__.py, so import the helper by path from the repo root
# (bench/convert.py does the same) rather than relying on pytest's rootdir.
_REPO = pathlib.Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from tests.interop.gobuild import build_esgzcheck, require_go  # noqa: E402


@pytest.fixture(scope="session")
def esgzcheck() -> pathlib.Path:
    """Path of the compiled Go reference checker; skips when Go is unavailable."""
    require_go()
    return build_esgzcheck()
