"""Serving plane: the Ray Serve prediction API with blue/green model slots.

Design (why one hop)
--------------------
Measured on the 2-core target machine (Ray 2.60): Serve's default Python proxy tops out near
230 req/s; its HAProxy ingress (``RAY_SERVE_ENABLE_HA_PROXY=1``) near 2,400 req/s; every extra
DeploymentHandle hop (a router deployment in front of model deployments) costs 3-7x in
throughput and several ms. So a request takes exactly one hop: HAProxy → one replica of one
FastAPI-ingress deployment (:mod:`serve_app.app`). Each replica holds, in process:

- both slots' models of every asset (:mod:`serve_app.slots`; identical model files share one
  predictor), kept in step with the routing table in Redis and the registry's aliases by a
  background thread that loads new versions off the request path and swaps an immutable state;
- a copy of the online features and safety state (:mod:`serve_app.feature_cache`), refreshed
  from Redis by another thread;
- the routing rules (:mod:`serve_app.routing`, pure) and a precomputed per-asset view
  (:mod:`serve_app.predictor`), so a request is a lookup, a hash, one or two engine calls and a
  JSON dump;
- an asynchronous prediction log (:mod:`serve_app.prediction_log`) and mergeable metrics
  (:mod:`serve_app.metrics`).

``POST /v1/predict`` is served by a thin ASGI fast path in front of FastAPI (same validation
model, same errors), which removed a third of the replica's CPU per request; scoring runs on a
small pool of persistent threads (the engines release the GIL). Admin changes go to Redis (the
single source of truth, compare-and-set, versioned) and the registry; every replica follows
within ``serve.feature_refresh_s``.
"""
