"""`maxdeeplab jobs [--address URL] [--follow ID | --stop ID]`: the Ray jobs of a cluster.

Without a flag: one line per job, oldest first: submission id, status, start time (local), the
command (short) and, for jobs `maxdeeplab submit` sent, the MLflow experiment and run name from the
job's metadata (with the experiment's URL when the tracking server is http(s)).
`--follow ID` prints a job's logs until it ends and exits as `submit` does (0 SUCCEEDED, 1 FAILED,
130 STOPPED); `--stop ID` asks the cluster to stop it. The address and the auth token are found as
for `maxdeeplab submit`.
"""

from __future__ import annotations

import argparse
from typing import Any

ENTRY_WIDTH = 60


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from maxdeeplab.cli.commands.submit import add_address_argument

    add_address_argument(parser)
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--follow", metavar="ID", help="print a job's logs until it ends")
    action.add_argument("--stop", metavar="ID", help="stop a running job")


def run(args: argparse.Namespace) -> int:
    from maxdeeplab.cli.commands.submit import cluster_errors, connect, dashboard_url, follow
    from maxdeeplab.platform.errors import ClusterError

    url = dashboard_url(args.address)
    with cluster_errors(url):
        client = connect(url)
        job_id = args.follow or args.stop
        if job_id:
            try:
                client.get_job_info(job_id)
            except RuntimeError:  # the job server answers 404
                raise ClusterError(f"no job {job_id} on the Ray cluster at {url}") from None
        if args.follow:
            return follow(client, url, args.follow)
        if args.stop:
            stopped = client.stop_job(args.stop)
            print(f"job {args.stop}: {'stopping' if stopped else 'already ended'}")
            return 0
        jobs = sorted(client.list_jobs(), key=lambda job: job.start_time or 0)
    if not jobs:
        print(f"no jobs on {url}")
    for job in jobs:
        print(format_job(job))
    return 0


def format_job(job: Any) -> str:
    """`id  STATUS  start  command  mlflow ...` for one `JobDetails`."""
    import shlex
    import time

    from maxdeeplab.cli.commands.submit import (
        ENTRYPOINT,
        META_EXPERIMENT,
        META_RUN,
        mlflow_link,
    )

    job_id = job.submission_id or job.job_id or "-"
    start = (
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.start_time / 1000))
        if job.start_time
        else "-"
    )
    metadata = job.metadata or {}
    entry = job.entrypoint or ""
    prefix = " ".join(ENTRYPOINT) + " "
    if entry.startswith(prefix):
        entry = "maxdeeplab " + entry[len(prefix) :]
    if metadata.get(META_RUN):  # the run name has its own column
        entry = entry.replace(f" --name {shlex.quote(metadata[META_RUN])}", "")
    if len(entry) > ENTRY_WIDTH:
        entry = entry[: ENTRY_WIDTH - 3] + "..."
    line = f"{job_id}  {job.status!s:<9}  {start}  {entry}"
    if metadata.get(META_EXPERIMENT):
        line += f"  mlflow {metadata[META_EXPERIMENT]}/{metadata.get(META_RUN, '')}"
        link = mlflow_link(metadata)
        if link:
            line += f" {link}"
    return line
