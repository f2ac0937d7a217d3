"""One place that starts or joins Ray, so every entry point (extract, verify, tests) agrees."""

from __future__ import annotations

import os


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join ``address`` or start an embedded local cluster, unless Ray is already up in this process.

    The embedded cluster gets no dashboard and quiet logging: it exists for this job only.
    """
    import ray

    if ray.is_initialized():
        return
    # Workers must import this project even when it runs from a source tree (`python cli.py`):
    # the raylet inherits the driver's environment, so PYTHONPATH carries the repository root.
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if repo not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([repo, *paths])
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    kwargs = dict(include_dashboard=False, configure_logging=True, logging_level="warning", log_to_driver=True)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:
        # "local", not None: ray.init() with no address joins the cluster last started with `ray start` on
        # this machine (its address file in /tmp/ray), which is never what an embedded run means.
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), **kwargs)
