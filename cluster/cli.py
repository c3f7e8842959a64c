"""Subcommands of `offside` provided by this package (ray is imported inside the command functions):
`offside submit` and `offside jobs list|status|logs|stop`, through the Ray Jobs API."""

from __future__ import annotations

import argparse
import json


def cmd_submit(args) -> None:
    from cluster.jobs import follow, parse_env, require_success, submit

    address, job_id = submit(args.command, address=args.address, runtime_env_file=args.runtime_env,
                             working_dir=args.working_dir, env=parse_env(args.env or []), python=args.python)
    print(job_id, flush=True)
    if args.wait:
        require_success(address, job_id, follow(address, job_id))
        print(f"job {job_id} SUCCEEDED")


def cmd_jobs_list(args) -> None:
    from cluster.jobs import list_jobs

    jobs = list_jobs(args.address)
    if args.json:
        print(json.dumps([{"id": j.submission_id or j.job_id, "status": str(j.status), "entrypoint": j.entrypoint} for j in jobs]))
        return
    for job in jobs:
        print(f"{job.submission_id or job.job_id}\t{job.status}\t{job.entrypoint}")


def cmd_jobs_status(args) -> None:
    from cluster.jobs import job_info

    info = job_info(args.address, args.job_id)
    print(f"{info.status}" + (f"\t{info.message}" if info.message else ""))


def cmd_jobs_logs(args) -> None:
    from cluster.jobs import follow, job_logs

    if args.follow:
        follow(args.address, args.job_id)
    else:
        print(job_logs(args.address, args.job_id), end="")


def cmd_jobs_stop(args) -> None:
    from cluster.jobs import stop_job

    print(stop_job(args.address, args.job_id))


ADDRESS_HELP = "Ray dashboard URL, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS if a URL, else http://127.0.0.1:8265)"


def add_commands(sub) -> None:
    """Adds this package's subcommands to the `offside` parser."""
    submit = sub.add_parser("submit", help="run an offside command on a Ray cluster (Ray Jobs API)",
                            description="offside submit [--address URL] [--runtime-env FILE] [--wait] -- <offside command>")
    submit.add_argument("--address", help=ADDRESS_HELP)
    submit.add_argument("--runtime-env", metavar="FILE", help="Ray runtime env YAML (env_vars, working_dir, pip, ...)")
    submit.add_argument("--working-dir", help="directory uploaded as the job's working dir (default: the runtime env's, else .)")
    submit.add_argument("--env", action="append", metavar="NAME=VALUE", help="environment variable for the job (repeatable)")
    submit.add_argument("--python", help="interpreter on the cluster that has offside installed (default: `python` on the cluster's PATH)")
    submit.add_argument("--wait", action="store_true", help="stream the job's logs and exit non-zero unless it SUCCEEDED")
    submit.add_argument("command", nargs=argparse.REMAINDER, help="-- then the offside command, e.g. -- tune --config sweep.yaml")
    submit.set_defaults(func=cmd_submit)

    jobs = sub.add_parser("jobs", help="list, inspect, follow and stop jobs on a Ray cluster").add_subparsers(dest="jobs_command", required=True)
    listing = jobs.add_parser("list", help="every job on the cluster: id, status, entrypoint")
    listing.add_argument("--json", action="store_true", help="one line of JSON")
    listing.set_defaults(func=cmd_jobs_list)
    for name, func, help_text in (("status", cmd_jobs_status, "a job's status and message"),
                                  ("logs", cmd_jobs_logs, "a job's logs"),
                                  ("stop", cmd_jobs_stop, "stop a job; prints its final status")):
        p = jobs.add_parser(name, help=help_text)
        p.add_argument("job_id")
        p.set_defaults(func=func)
        if name == "logs":
            p.add_argument("--follow", action="store_true", help="stream until the job ends")
    for p in (listing, *(jobs.choices[n] for n in ("status", "logs", "stop"))):
        p.add_argument("--address", help=ADDRESS_HELP)
