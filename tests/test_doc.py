"""Every public object has a numpydoc docstring and the package passes its lint rules."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_package_passes_ruff_with_pydocstyle():
    """ruff's pycodestyle, pyflakes and numpy-convention pydocstyle rules (pyproject.toml)."""
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is part of the test extra: pip install -e '.[test]'")
    proc = subprocess.run([ruff, "check", "--no-cache", str(ROOT / "cannon_fast")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:]


def test_importing_the_package_is_quiet():
    """No logging handlers, warning filters or numba config changes on import (STYLE §5)."""
    code = ("import logging, warnings, numba, scipy.optimize, scipy.special; before = (list(warnings.filters), "
            "numba.config.NUMBA_NUM_THREADS); import cannon_fast, logging; "
            "assert logging.getLogger().handlers == []; "
            "assert (list(warnings.filters), numba.config.NUMBA_NUM_THREADS) == before; "
            "import sys; assert 'torch' not in sys.modules and 'dask' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
