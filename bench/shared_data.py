"""Where the shared market data lives, and the machine a benchmark ran on.

The shared file sits beside the repository (``../shared/data``) or, for a git worktree kept in
a folder of worktrees, one level further up; ``--path`` on each benchmark overrides both.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHARED_NAME = Path("shared") / "data" / "btc_multivenue_1min_2023-03-01_09.csv.gz"
CANDIDATES: tuple[Path, ...] = (ROOT.parent / SHARED_NAME, ROOT.parent.parent / SHARED_NAME)


def shared_file() -> Path:
    """The first candidate that exists (the first one, for the error message, if none does)."""
    for path in CANDIDATES:
        if path.is_file():
            return path
    return CANDIDATES[0]


def machine(**libraries: str) -> dict[str, Any]:
    """Platform, CPUs, load and versions (plus ``libraries``: name -> version)."""
    import pandas as pd

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pandas": pd.__version__,
        **libraries,
    }
