"""Submit one Ray job with ``JobSubmissionClient`` and wait for it (run as a user would).

``python -m tests.ops.submit_job --address URL --runtime-env-json JSON -- ENTRYPOINT...``

Runs in its own process with the user's environment (the tests' isolated head's ``HOME`` and
``RAY_TMPDIR``, no ``RAY_AUTH_MODE``): :func:`tickcast.ray_auth.attach_token_auth` finds the
token as Ray's CLI would, so the client authenticates. Prints one JSON line: the job id, its
final status and its logs.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

from tickcast.ray_auth import attach_token_auth


def main(argv: list[str] | None = None) -> int:
    """Submit, wait for a terminal status (or the timeout), print the JSON line."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--address", required=True, help="the dashboard (job server) URL")
    ap.add_argument("--runtime-env-json", default="{}")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("entrypoint", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    parts = args.entrypoint[1:] if args.entrypoint[:1] == ["--"] else args.entrypoint
    auth = attach_token_auth()

    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(args.address)
    job_id = client.submit_job(entrypoint=shlex.join(parts),
                               runtime_env=json.loads(args.runtime_env_json))
    deadline = time.monotonic() + args.timeout
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(1.0)
        status = client.get_job_status(job_id)
    if not status.is_terminal():
        client.stop_job(job_id)
    print(json.dumps({"job_id": job_id, "status": str(status.value if isinstance(status, JobStatus)
                                                          else status),
                      "auth": auth.describe(), "logs": client.get_job_logs(job_id)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
