"""tickcast: multi-provider consensus prices, 1-minute bars and calibrated forecasts on Ray."""

__version__ = "0.1.0"
