"""Request and response models of the prediction API (pydantic; published at ``/docs``).

Requests reject unknown fields, so a misspelled key is a 422 naming it rather than silently
ignored. Feature values may be ``null`` (a missing value, which the tree models handle) but
never infinite.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Same alphabet as the model registry's asset directories (a name that cannot be a directory
# there cannot have a model).
ASSET_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
MAX_FEATURES = 512

Asset = Annotated[str, Field(pattern=ASSET_PATTERN, max_length=64,
                             description="Asset symbol, e.g. BTC-USD.", examples=["BTC-USD"])]
FeatureValue = Annotated[float | None, Field(allow_inf_nan=False)]
FeatureMap = Annotated[dict[str, FeatureValue], Field(
    max_length=MAX_FEATURES,
    description="Explicit feature values by name (null = missing); must match the model's "
                "feature schema exactly (GET /v1/models lists the names).")]
Price = Annotated[float, Field(gt=0, allow_inf_nan=False,
                               description="Reference price (last close) for explicit features.")]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PredictRequest(_Request):
    """Forecast one asset: from its online features, or from explicit ones."""

    asset: Asset
    features: FeatureMap | None = None
    price: Price | None = None
    explain: bool = Field(False, description="Also return each feature's contribution to the "
                                             "median forecast (XGBoost TreeSHAP), the top 5 by "
                                             "magnitude. Costs milliseconds; off by default.")

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"asset": "BTC-USD"}, {"asset": "BTC-USD", "explain": True}]})


class BatchRow(_Request):
    """One explicit row of a batch request."""

    asset: Asset
    features: FeatureMap
    price: Price | None = None


class BatchPredictRequest(_Request):
    """Forecast many assets in one call: ``assets`` (online features) or explicit ``rows``."""

    assets: list[Asset] | None = Field(None, min_length=1)
    rows: list[BatchRow] | None = Field(None, min_length=1)
    format: Literal["records", "columns"] = Field(
        "records", description="`records`: a list of prediction objects; `columns`: one array per "
                               "field (compact and faster for large batches).")

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"assets": ["BTC-USD", "ETH-USD"]}]})

    @model_validator(mode="after")
    def _exactly_one(self) -> "BatchPredictRequest":
        if (self.assets is None) == (self.rows is None):
            raise ValueError("give exactly one of 'assets' or 'rows'")
        return self


class TrafficRequest(_Request):
    """Change the blue/green split and/or shadow mode (all routed assets, or those listed)."""

    green_weight: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False,
                                       description="Share of requests served by green.")
    shadow: bool | None = Field(None, description="Mirror every request to the other slot.")
    assets: list[Asset] | None = Field(None, min_length=1)

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"green_weight": 0.1, "shadow": True}]})

    @model_validator(mode="after")
    def _something(self) -> "TrafficRequest":
        if self.green_weight is None and self.shadow is None:
            raise ValueError("give green_weight and/or shadow")
        return self


class PromoteRequest(_Request):
    """Promote a version to champion (default: the version in each asset's idle slot)."""

    asset: Asset | None = Field(None, description="Default: every routed asset.")
    version: str | None = Field(None, pattern=VERSION_PATTERN,
                                description="Registry version or alias; needs `asset`.")

    @model_validator(mode="after")
    def _version_needs_asset(self) -> "PromoteRequest":
        if self.version is not None and self.asset is None:
            raise ValueError("'version' needs 'asset'")
        return self


class RollbackRequest(_Request):
    """Roll back to the registry's ``previous`` champion."""

    asset: Asset | None = Field(None, description="Default: every routed asset.")


# ----------------------------------------------------------------------- responses
class ForecastStatus(str, Enum):
    """What a served forecast is fit for."""

    OK = "ok"  # calibrated interval, exposure allowed
    HALTED = "halted"  # the safety breaker holds exposure at zero (multiplier 0)
    UNCALIBRATED = "uncalibrated"  # the model has no conformal state: raw [q05, q95] interval


class Contribution(BaseModel):
    """One feature's contribution to the median forecast."""

    feature: str
    value: float | None = Field(description="The feature's value in the explained row (null: missing).")
    contribution: float = Field(description="Its share of the median, in log-return units.")


class Explanation(BaseModel):
    """The median forecast split by feature (XGBoost's exact TreeSHAP on the native booster).

    ``base_value + sum(contributions) + other_features`` equals the model's median (the served
    ``pred_log_return``, within float32 rounding).
    """

    method: Literal["xgboost_treeshap"]
    target: str = Field(description="The output explained: the median quantile, e.g. `q0.5`.")
    base_value: float = Field(description="The model's output before any feature (its bias).")
    contributions: list[Contribution] = Field(description="The 5 largest by magnitude, largest first.")
    other_features: float = Field(description="Sum of the contributions of all other features.")
    n_features: int


class Prediction(BaseModel):
    """One forecast of the next bar's log return, with its 90 % interval."""

    asset: str
    slot: Literal["blue", "green"]
    model_version: str
    status: ForecastStatus = Field(description="`ok`; `halted` when the safety breaker holds "
                                               "exposure at zero; `uncalibrated` when the model "
                                               "has no conformal calibration.")
    pred_log_return: float = Field(description="Median forecast of log(close_next / close).")
    lo_log_return: float = Field(description="Lower end of the calibrated interval.")
    hi_log_return: float = Field(description="Upper end of the calibrated interval.")
    coverage: float = Field(description="Nominal coverage of the interval (0.9).")
    price: float | None = Field(description="Close of the bar the features describe.")
    pred_price: float | None
    lo_price: float | None
    hi_price: float | None
    bar_ts: int | None = Field(description="Open time of the features' bar, UNIX ns (null for explicit features).")
    bar_time: str | None = Field(description="The same as ISO-8601 UTC.")
    feature_age_s: float | None = Field(description="Seconds since that bar closed.")
    regime: str = Field(description="Safety regime: NORMAL, ELEVATED or CRISIS.")
    multiplier: float = Field(description="Position-size multiplier of the regime.")
    halted: bool
    timestamp: str = Field(description="When the server answered, ISO 8601 UTC.")
    latency_ms: float | None = Field(None, description="Milliseconds from the request's arrival "
                                                       "at the replica to this answer.")
    request_id: str | None = None
    explanation: Explanation | None = Field(None, description="Only with `explain: true`.")


class BatchPrediction(BaseModel):
    """One forecast of a batch (the fields of :class:`Prediction` a batch row carries)."""

    asset: str
    slot: Literal["blue", "green"]
    model_version: str
    status: ForecastStatus
    pred_log_return: float
    lo_log_return: float
    hi_log_return: float
    coverage: float
    price: float | None
    pred_price: float | None
    lo_price: float | None
    hi_price: float | None
    bar_ts: int | None
    bar_time: str | None
    feature_age_s: float | None
    regime: str
    multiplier: float
    halted: bool


class PredictionError(BaseModel):
    """Why one asset of a batch got no forecast."""

    asset: str
    error: str
    detail: str


class BatchPredictResponse(BaseModel):
    """Forecasts of a batch, in request order, and the assets that got none.

    ``predictions`` (format ``records``) or ``columns`` (format ``columns``: the fields of
    :class:`Prediction` without ``timestamp``, ``latency_ms``, ``request_id`` and
    ``explanation``, one array each).
    """

    request_id: str
    count: int
    predictions: list[BatchPrediction] | None = None
    columns: dict[str, list[object]] | None = None
    errors: list[PredictionError]
    timestamp: str = Field(description="When the server answered, ISO 8601 UTC.")
    latency_ms: float


class ErrorResponse(BaseModel):
    """Every error answer: a code, a message and the field at fault when there is one."""

    error: str
    detail: str
    field: str | None = None
    request_id: str | None = None
    timestamp: str = Field(description="When the server answered, ISO 8601 UTC.")


class HealthResponse(BaseModel):
    """Liveness is the 200 itself; ``ready`` says whether predictions can be served."""

    status: Literal["ok", "degraded"]
    live: bool
    ready: bool
    reasons: list[str]
    replica: str
    routing_rev: int
    assets: dict[str, dict[str, object]]


class AdminResponse(BaseModel):
    """Outcome of an admin change: the committed routing revision and the routes it set."""

    action: str
    rev: int
    applied: bool = Field(description="This replica already serves the new revision.")
    routes: dict[str, dict[str, object]]
    changes: list[dict[str, object]]
