# tickcast: the prediction API (Ray Serve), its data plane and closed loop, in one image.
#
#   make image                      # docker or podman, whichever works here
#   docker run --rm -p 8000:8000 --shm-size=1g tickcast
#   curl -s -X POST localhost:8000/v1/predict -H 'content-type: application/json' -d '{"asset": "BTC-USD"}'
#
# With no arguments the container trains a model per asset when the registry (/data, a volume)
# has none, then serves on 0.0.0.0:8000 with the simulator feed (tickcast/container.py). Any
# other command runs instead: `docker run tickcast tickcast train --asset BTC-USD ...`, or
# `ray start --head --block ...` for a Ray node of compose.yaml / deploy/rayservice.yaml.

# ---------------------------------------------------------------------------------- build
FROM debian:bookworm-slim AS python
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update -q \
 && apt-get install -y -q --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# The dependency list alone: the layer below that installs it is rebuilt only when the list
# changes, not when pyproject.toml's tool sections or extras do.
FROM python AS requirements
COPY pyproject.toml /tmp/pyproject.toml
RUN python3 -c 'import tomllib; print("\n".join(tomllib.load(open("/tmp/pyproject.toml", "rb"))["project"]["dependencies"]))' > /requirements.txt

FROM python AS build
# PIP_CERT: a CA bundle for pip where a proxy re-signs TLS (make image passes this host's).
ARG PIP_CERT
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv && pip install -q --upgrade pip setuptools wheel
COPY --from=requirements /requirements.txt /tmp/requirements.txt
RUN pip install -q -r /tmp/requirements.txt

# ---------------------------------------------------------------------------------- runtime
FROM debian:bookworm-slim
ENV DEBIAN_FRONTEND=noninteractive
# gcc + libc6-dev: the predictor compiles the ONNX trees into a C kernel at first load (9 µs a
# row instead of onnxruntime's 37). tini: PID 1 that reaps Ray's worker processes and forwards
# the stop signal to the server.
RUN apt-get update -q \
 && apt-get install -y -q --no-install-recommends python3 gcc libc6-dev tini ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 tickcast \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/tickcast --shell /usr/sbin/nologin tickcast \
 && mkdir -p /data && chown tickcast:tickcast /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY . .
# The code, root-owned (the server writes only to /data). Editable: it stays in /app, which is
# what Ray ships as working_dir to a cluster and where configs/default.yaml is found. Installed
# here, so that a code change leaves the (large) venv layer above as it is.
RUN pip install -q --no-deps --no-build-isolation -e . && python3 -m compileall -q tickcast actors serve_app training
ENV PYTHONUNBUFFERED=1 \
    TICKCAST_DATA_DIR=/data \
    TICKCAST__SERVE__HOST=0.0.0.0 \
    TICKCAST__SERVE__PORT=8000 \
    RAY_USAGE_STATS_ENABLED=0
USER tickcast
VOLUME ["/data"]
EXPOSE 8000
# Liveness of the API (the first start trains for several minutes: a long start period).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20m --retries=3 \
  CMD python3 -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v1/health?probe=live' % os.environ.get('TICKCAST__SERVE__PORT', '8000'), timeout=4)" || exit 1
ENTRYPOINT ["tini", "--"]
CMD ["python", "-m", "tickcast.container"]
