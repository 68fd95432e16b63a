"""Backtest report: one PNG (three panels) and a small self-contained HTML page embedding it.

Panels:

1. equity of the sign strategy of the median forecast after fees (the strategy
   :func:`training.evaluation.sign_strategy` scores), next to buy-and-hold;
2. predicted vs realized: the realized log return, the median forecast and the calibrated 90 %
   interval over the last ``tail_bars`` bars;
3. rolling coverage of the calibrated interval (window ``coverage_window`` bars) against the
   90 % target.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from training.evaluation import BP


def strategy_returns(y: np.ndarray, pred: np.ndarray, fee_bp: float) -> np.ndarray:
    """Per-bar simple returns of holding ``sign(pred)``, paying ``fee_bp`` per unit of position
    change (the convention of :func:`training.evaluation.sign_strategy`, as a series to plot).

    Examples
    --------
    >>> strategy_returns(np.array([0.01, -0.01]), np.array([1.0, -1.0]), 0.0).round(5).tolist()
    [0.01005, 0.00995]
    """
    pos = np.sign(pred)
    change = np.abs(np.diff(np.concatenate(([0.0], pos))))
    return pos * np.expm1(y) - fee_bp * BP * change


def rolling_coverage(inside: np.ndarray, window: int) -> np.ndarray:
    """Share of ``inside`` (bool) over the trailing ``window`` rows (NaN until full).

    Examples
    --------
    >>> rolling_coverage(np.array([1, 1, 0, 1], dtype=bool), 2).tolist()
    [nan, 1.0, 0.5, 0.5]
    """
    x = inside.astype(np.float64)
    out = np.full(len(x), np.nan)
    if len(x) >= window:
        c = np.concatenate(([0.0], np.cumsum(x)))
        out[window - 1:] = (c[window:] - c[:-window]) / window
    return out


def write_report(
    out_dir: Path,
    name: str,
    ts: np.ndarray,
    y: np.ndarray,
    q50: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    metrics: dict[str, Any],
    fee_bp: float,
    title: str,
    coverage_window: int = 240,
    tail_bars: int = 720,
) -> tuple[Path, Path]:
    """Draw the three panels, write ``<name>.png`` and ``<name>.html``; returns both paths.

    Rows with a NaN in any series are left out of the plots (the metrics already skip them).
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and Ray workers
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    ok = np.isfinite(y) & np.isfinite(q50) & np.isfinite(lo) & np.isfinite(hi)
    ts, y, q50, lo, hi = ts[ok], y[ok], q50[ok], lo[ok], hi[ok]
    times = ts.astype("datetime64[ns]")
    fig, axes = plt.subplots(3, 1, figsize=(11, 10), constrained_layout=True)

    ax = axes[0]
    if len(y):
        strat = np.cumprod(1.0 + strategy_returns(y, q50, fee_bp)) - 1.0
        hold = np.expm1(np.cumsum(y))
        ax.plot(times, strat / BP, label=f"sign(median) after {fee_bp:g} bp fees", lw=1.0)
        ax.plot(times, hold / BP, label="buy and hold", lw=1.0, alpha=0.7)
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.set_ylabel("cumulative return (bp)")
    ax.set_title("Equity")
    ax.legend(loc="best")

    ax = axes[1]
    tail = slice(max(0, len(y) - tail_bars), len(y))
    ax.fill_between(times[tail], lo[tail] / BP, hi[tail] / BP, color="tab:blue", alpha=0.2,
                    label="calibrated 90% interval", step="mid")
    ax.plot(times[tail], q50[tail] / BP, color="tab:blue", lw=0.8, label="median forecast")
    ax.plot(times[tail], y[tail] / BP, color="black", lw=0.5, alpha=0.7, label="realized")
    ax.set_ylabel("next-bar log return (bp)")
    ax.set_title(f"Predicted vs realized (last {min(tail_bars, len(y))} bars)")
    ax.legend(loc="upper left")

    ax = axes[2]
    inside = (y >= lo) & (y <= hi)
    ax.plot(times, rolling_coverage(inside, coverage_window), lw=1.0,
            label=f"rolling coverage ({coverage_window} bars)")
    ax.axhline(0.9, color="red", lw=0.8, ls="--", label="target 0.90")
    ax.set_ylim(0.5, 1.02)
    ax.set_ylabel("coverage")
    ax.set_title("Interval coverage")
    ax.legend(loc="lower left")
    fig.suptitle(title)

    png = out_dir / f"{name}.png"
    fig.savefig(png, dpi=90)
    plt.close(fig)

    shown = {k: v for k, v in metrics.items() if k != "verdict"}
    rows = "\n".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(json.dumps(v, default=float))}</td></tr>"
        for k, v in shown.items())
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}
th{{text-align:left;padding-right:1em}} td{{font-family:monospace}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p><strong>Verdict:</strong> {html.escape(str(metrics.get("verdict", "")))}</p>
<img alt="equity, predicted vs realized, rolling coverage" style="width:100%"
 src="data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}">
<h2>Metrics</h2><table>{rows}</table>
</body></html>
"""
    page_path = out_dir / f"{name}.html"
    page_path.write_text(page)
    return png, page_path
