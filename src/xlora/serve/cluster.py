"""Scale-out serving on Ray Serve: the app of :func:`~xlora.serve.app.create_app` on N replicas.

Each replica (``@serve.ingress`` around a :class:`ReplicaApp`) has its own model copy and batcher;
Ray Serve's HTTP proxy sends each request to one, which names itself in ``x-xlora-replica``. A
:class:`Coordinator` actor, long-polled by the replicas, carries to all of them the driver's shutdown
order (each then behaves as the single-process server on SIGTERM) and ``/metrics`` scrapes, which are
**aggregated**: the proxy sends a scrape to any replica, so per-replica counters would jump between
replicas from scrape to scrape; the sums (a departed replica's last counters included) never go down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xlora.config import check_float, check_int
from xlora.serve.app import SHUTDOWN_MARGIN_S, ServerConfig
from xlora.serve.coordinator import Coordinator, merge_metrics

REPLICA_HEADER = "x-xlora-replica"
APP_NAME = NAMESPACE = "xlora"
SCRAPE_WAIT_S = 2.0  # /metrics waits this long at most for the other replicas' counters
log = logging.getLogger(__name__)


@dataclass
class ClusterConfig:
    """How :func:`serve_cluster` deploys the app: ``replicas`` model copies (the initial number when
    autoscaling), each with ``cpus_per_replica`` Ray CPUs (``max(1, int(...))`` torch threads) and
    ``gpus_per_replica`` GPUs; ``ray_address`` joins a running cluster (``"auto"`` after ``ray start``),
    ``None`` starts a fresh local instance (``object_store_mb`` its object store), shut down on exit.
    Any of ``min_replicas`` (default 1), ``max_replicas`` (default ``replicas``) and
    ``target_ongoing_requests`` turns on Ray Serve's autoscaling."""

    replicas: int = 1
    ray_address: str | None = None
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None
    object_store_mb: int | None = None

    def __post_init__(self) -> None:
        for name in ("replicas", "min_replicas", "max_replicas", "object_store_mb"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 0 if name == "min_replicas" else 1)
        for name in ("cpus_per_replica", "gpus_per_replica", "target_ongoing_requests"):
            value = getattr(self, name)
            if value is not None and check_float(name, value) < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        low, high = self.scale_range
        if not low <= self.replicas <= high:
            raise ValueError(f"replicas={self.replicas} must lie in min_replicas..max_replicas = {low}..{high}")

    @property
    def scale_range(self) -> tuple[int, int]:
        low = 1 if self.min_replicas is None else self.min_replicas
        return low, max(self.replicas, low) if self.max_replicas is None else self.max_replicas

    def deployment_options(self, server: ServerConfig) -> dict[str, Any]:
        """Keyword arguments of ``serve.deployment`` for replicas of ``server``."""
        opts: dict[str, Any] = {
            "name": "XLoraReplica", "num_replicas": self.replicas,
            "ray_actor_options": {"num_cpus": self.cpus_per_replica, "num_gpus": self.gpus_per_replica},
            "max_ongoing_requests": server.max_batch + server.max_queue,  # the replica's own queue answers 429
            "graceful_shutdown_wait_loop_s": 0.2,
            "graceful_shutdown_timeout_s": server.shutdown_timeout_s + SHUTDOWN_MARGIN_S + 5.0,
        }
        if (self.min_replicas, self.max_replicas, self.target_ongoing_requests) != (None, None, None):
            low, high = self.scale_range
            scale = {"min_replicas": low, "initial_replicas": opts.pop("num_replicas"), "max_replicas": high}
            if self.target_ongoing_requests is not None:
                scale["target_ongoing_requests"] = self.target_ongoing_requests
            opts["autoscaling_config"] = scale
        return opts


def import_ray() -> tuple[Any, Any]:
    """``(ray, ray.serve)``, or a ValueError saying how to install them."""
    try:
        import ray
        from ray import serve
    except ImportError as err:
        raise ValueError(f"--replicas needs Ray Serve, which cannot be imported ({err}): "
                         "pip install 'xlora[cluster]', or serve without --replicas") from None
    return ray, serve


# ---------------------------------------------------------------------- one replica
class ReplicaApp:
    """One replica's ASGI app: builds :func:`~xlora.serve.app.create_app` at lifespan startup, names
    itself in :data:`REPLICA_HEADER`, answers ``/metrics`` for all replicas, follows the coordinator."""

    def __init__(self, model_dir: str, config: ServerConfig, load_kwargs: dict[str, Any], coordinator: str,
                 threads: int, gpus: float) -> None:
        self.model_dir, self.config, self.load_kwargs = model_dir, config, load_kwargs
        self.coordinator_name, self.threads, self.gpus = coordinator, threads, gpus
        self.app: Any = None
        self.coordinator: Any = None
        self.name, self.inflight, self.scrape = "", 0, 0
        self.idle_watch: asyncio.Task | None = None  # reports idle once a shutdown order has been carried out

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return await self.lifespan(scope, receive, send)
        self.inflight += 1
        try:
            if scope["type"] == "http" and scope["path"] == "/metrics" and scope["method"] == "GET":
                return await self.metrics(scope, receive, send)
            await self.app(scope, receive, self.tagged(send))
        finally:
            self.inflight -= 1

    def tagged(self, send: Any) -> Any:
        async def send_tagged(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER.encode(), self.name.encode())]}
            await send(message)
        return send_tagged

    def build(self) -> Any:
        """Load this replica's model copy and make the app (in a worker thread: it takes a while)."""
        import ray
        import torch
        from ray import serve

        from xlora.pretrained import load_model_and_tokenizer
        from xlora.serve.app import create_app

        torch.set_num_threads(self.threads)
        model, tokenizer = load_model_and_tokenizer(self.model_dir, **self.load_kwargs)
        if self.gpus and torch.cuda.is_available():
            model.to("cuda")
        self.name = str(serve.get_replica_context().replica_id.unique_id)
        self.coordinator = ray.get_actor(self.coordinator_name, namespace=NAMESPACE)
        return create_app(model, tokenizer, self.config)

    async def lifespan(self, scope: dict, receive: Any, send: Any) -> None:
        """Build the app on startup, then hand it the lifespan (its batcher starts and closes there)."""
        from starlette.concurrency import run_in_threadpool

        startup = [await receive()]
        try:
            self.app = await run_in_threadpool(self.build)
        except Exception as err:  # noqa: BLE001 - Ray reports a failed start (and logs the reason)
            return await send({"type": "lifespan.startup.failed", "message": f"{type(err).__name__}: {err}"})
        follower: asyncio.Task | None = None

        async def send_watched(message: dict) -> None:
            nonlocal follower
            if message["type"] == "lifespan.startup.complete":
                follower = asyncio.get_running_loop().create_task(self.follow())
            elif message["type"] == "lifespan.shutdown.complete" and follower is not None:
                follower.cancel()
                with contextlib.suppress(Exception):  # the coordinator may be gone with the driver
                    await asyncio.wait_for(self.report(idle=True, leaving=True), 5.0)
            await send(message)

        async def receive_replayed() -> dict:
            return startup.pop() if startup else await receive()

        await self.app(scope, receive_replayed, send_watched)

    def idle(self) -> bool:
        batcher = self.app.state.batcher
        return not (batcher.accepting or batcher.active_rows or batcher.queue_length or self.inflight)

    async def report(self, idle: bool = False, leaving: bool = False) -> None:
        text = self.app.state.metrics.render()
        await self.coordinator.report.remote(self.name, self.scrape, text, idle, leaving)

    async def follow(self) -> None:
        """Answer the coordinator's scrapes and shutdown orders until the replica stops."""
        seen: tuple[int, float | None] = (0, None)
        try:
            while True:
                self.scrape, grace = await self.coordinator.poll.remote(self.name, seen)
                if grace is not None and grace != seen[1]:
                    self.app.state.batcher.begin_shutdown(grace)
                    if self.idle_watch is None:  # (a reference kept: the loop holds tasks only weakly)
                        self.idle_watch = asyncio.get_running_loop().create_task(self.report_when_idle())
                seen = (self.scrape, grace)
                await self.report(idle=self.idle())
        except Exception as err:  # noqa: BLE001 - the driver is gone: serve on, alone
            if seen[1] is None:  # unexpected; after a shutdown order the driver going away is the plan
                log.warning("replica %s lost the coordinator (%s); its /metrics are its own now", self.name, err)
            self.coordinator = None

    async def report_when_idle(self) -> None:
        while not self.idle():
            await asyncio.sleep(0.05)
        with contextlib.suppress(Exception):
            await self.report(idle=True)

    async def metrics(self, scope: dict, receive: Any, send: Any) -> None:
        from starlette.responses import PlainTextResponse

        start, own = time.perf_counter(), self.app.state.metrics
        try:
            texts, live = await self.coordinator.collect.remote(SCRAPE_WAIT_S)
        except Exception:  # noqa: BLE001 - no coordinator: this replica's figures alone
            texts, live = [own.render()], 1
        body = merge_metrics(texts) + ("# HELP xlora_replicas Live replicas of the deployment.\n"
                                       f"# TYPE xlora_replicas gauge\nxlora_replicas {live}\n")
        response = PlainTextResponse(body, media_type="text/plain; version=0.0.4", headers={REPLICA_HEADER: self.name})
        await response(scope, receive, send)
        own.observe_request("/metrics", 200, time.perf_counter() - start)


class XLoraReplica:
    """The deployment class; its ASGI app (a :class:`ReplicaApp`) does the work."""


# ---------------------------------------------------------------------- the driver
def serve_cluster(model_dir: str | os.PathLike, config: ServerConfig, cluster: ClusterConfig,
                  base_model: str | None = None, log_level: str = "info", **base_kwargs: Any) -> None:
    """Deploy ``model_dir`` on Ray Serve replicas and serve it until SIGTERM or Ctrl-C (see the module
    doc); each replica loads it as :func:`~xlora.serve.app.serve` does (``base_model``, ``base_kwargs``)."""
    ray, serve = import_ray()
    config = config.serving(model_dir)  # clients may name the model by its path, as given or absolute
    model_dir = str(Path(model_dir).resolve())  # replicas run in other folders (and on other machines)
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"model directory {model_dir!r} does not exist")
    if base_model is not None and Path(base_model).exists():
        base_model = str(Path(base_model).resolve())
    own, level = cluster.ray_address is None, getattr(logging, log_level.upper(), logging.INFO)
    local = {"include_dashboard": False, "object_store_memory": (cluster.object_store_mb or 0) << 20 or None}
    got, serving = [], []
    catch_signals(got, serving)
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by Ray's processes: a Ctrl-C is ours alone
        ray.init(address=cluster.ray_address or "local", logging_level=max(level, logging.WARNING),
                 **(local if own else {}))
        catch_signals(got, serving)  # again: ray.init sets its own SIGTERM handler
        logging.getLogger("ray.serve").setLevel(max(level, logging.WARNING))
        coordinator = deploy(ray, serve, model_dir, config, cluster, {"base_model": base_model, **base_kwargs},
                             log_level)
        serving.append(True)
        print(f"xlora serve: {cluster.replicas} replica(s) of {model_dir} on http://{config.host}:{config.port} "
              f"(Ray Serve{'' if own else ' at ' + str(cluster.ray_address)})", flush=True)
        while not got:  # (a signal that Ray swallowed during start-up is in `got` too)
            time.sleep(0.2)
        drain(ray, coordinator, config.shutdown_timeout_s, got)
    except KeyboardInterrupt:  # a signal before the replicas were up: no requests to wait for
        pass
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown() if own else serve.delete(APP_NAME)
        stop_ray(ray, own)
    if got:  # end as the signal would have ended us, as uvicorn does
        signal.signal(got[0], signal.SIG_DFL)
        signal.raise_signal(got[0])


def stop_ray(ray: Any, own: bool) -> None:
    """Disconnect; a local instance is shut down, and any of its processes still running 5 s later
    (Ray's agents can miss their raylet's end when a Ctrl-C hit them while starting) are killed."""
    import psutil

    ours = psutil.Process().children(recursive=True) if own else []
    ray.shutdown()
    for proc in psutil.wait_procs(ours, timeout=5)[1]:
        with contextlib.suppress(psutil.Error):
            proc.kill()


def catch_signals(got: list[int], serving: list[bool]) -> None:
    """Append each SIGTERM and SIGINT to ``got``; until ``serving`` is non-empty, also abort the
    start-up (KeyboardInterrupt)."""
    def on_signal(sig: int, frame: Any) -> None:
        got.append(sig)
        if not serving:
            raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)


def deploy(ray: Any, serve: Any, model_dir: str, config: ServerConfig, cluster: ClusterConfig,
           load_kwargs: dict[str, Any], log_level: str) -> Any:
    """Start the coordinator and the replicas; returns the coordinator once every replica is up."""
    check_resources(ray, cluster)
    apps: dict = {}
    with contextlib.suppress(Exception):  # Serve may not run yet on this cluster
        apps = serve.status().applications
    if APP_NAME in apps:
        raise ValueError(f"this Ray cluster already serves an application named {APP_NAME!r}: "
                         f"stop it first (`serve delete {APP_NAME}`) or use another cluster")
    name = f"coordinator-{os.getpid()}-{time.time_ns()}"
    coordinator = ray.remote(num_cpus=0)(Coordinator).options(name=name, namespace=NAMESPACE).remote()
    app = ReplicaApp(model_dir, config, load_kwargs, name, max(1, int(cluster.cpus_per_replica)),
                     cluster.gpus_per_replica)
    deployment = serve.deployment(serve.ingress(app)(XLoraReplica), **cluster.deployment_options(config))
    logs = {"log_level": log_level.upper(), "enable_access_log": log_level == "debug"}
    serve.start(http_options={"host": config.host, "port": config.port}, logging_config=logs)
    try:
        serve.run(deployment.options(logging_config=logs).bind(), name=APP_NAME, route_prefix="/", blocking=False)
    except Exception as err:  # noqa: BLE001 - e.g. a replica that cannot load the model
        last = str(err).strip().splitlines()[-1:] or [type(err).__name__]
        raise ValueError(f"the replicas did not start (their log above says why): {last[0]}") from None
    return coordinator


def check_resources(ray: Any, cluster: ClusterConfig) -> None:
    """Refuse replicas the cluster cannot place (Ray Serve would wait for them forever)."""
    have, n = ray.cluster_resources(), cluster.replicas
    for key, each, flag in (("CPU", cluster.cpus_per_replica, "--cpus-per-replica"),
                            ("GPU", cluster.gpus_per_replica, "--gpus-per-replica")):
        if each and n * each > have.get(key, 0):
            raise ValueError(f"{n} replica(s) x {each:g} {key} need {n * each:g} {key}s but the Ray cluster has "
                             f"{have.get(key, 0):g}: lower {flag} or --replicas, or add nodes")


def drain(ray: Any, coordinator: Any, grace_s: float, got: list[int]) -> None:
    """Order every replica to shut down with ``grace_s``; wait until all are idle (at most the grace
    plus the margin); a second signal makes the grace 0 (the running requests end now)."""
    ray.get(coordinator.begin_shutdown.remote(grace_s))
    deadline, forced = time.monotonic() + grace_s + SHUTDOWN_MARGIN_S, False
    while time.monotonic() < deadline and not ray.get(coordinator.drained.remote()):
        if len(got) > 1 and not forced:
            ray.get(coordinator.begin_shutdown.remote(0.0))
            forced = True
        time.sleep(0.05)
