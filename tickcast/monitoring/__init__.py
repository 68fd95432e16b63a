"""Closed-loop monitoring, pure parts: drift statistics and change detectors (``drift``,
``detectors``), per-asset safety state (``safety``), paper P&L (``pnl``) and the shared metric
names (``metrics_names``). Nothing here imports Ray or Redis; actors hold these objects.
"""
