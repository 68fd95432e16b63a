"""Request and response models of the prediction API (pydantic; published at ``/docs``).

Requests reject unknown fields, so a misspelled key is a 422 naming it rather than silently
ignored. Feature values may be ``null`` (a missing value, which the tree models handle) but
never infinite.
"""

from __future__ import annotations

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

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"asset": "BTC-USD"}]})


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
class Prediction(BaseModel):
    """One forecast of the next bar's log return, with its 90 % interval."""

    asset: str
    slot: Literal["blue", "green"]
    model_version: str
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
    latency_ms: float | None = None
    request_id: str | None = None


class PredictionError(BaseModel):
    """Why one asset of a batch got no forecast."""

    asset: str
    error: str
    detail: str


class BatchPredictResponse(BaseModel):
    """Forecasts of a batch, in request order, and the assets that got none.

    ``predictions`` (format ``records``) or ``columns`` (format ``columns``: the fields of
    :class:`Prediction` without ``latency_ms`` and ``request_id``, one array each).
    """

    request_id: str
    count: int
    predictions: list[Prediction] | None = None
    columns: dict[str, list[object]] | None = None
    errors: list[PredictionError]
    latency_ms: float


class ErrorResponse(BaseModel):
    """Every error answer: a code, a message and the field at fault when there is one."""

    error: str
    detail: str
    field: str | None = None
    request_id: str | None = None


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
