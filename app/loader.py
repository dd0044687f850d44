"""The model loader: fetch the GGUF, check it, load the engine, hand it to the lifecycle, on its own thread.

The port is already bound (health answers 503 `loading`) while this runs; a failure ends the run through the
lifecycle with a one-line cause.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from app.config import AppConfig
from app.lifecycle import Lifecycle
from app.model_source import ModelSourceError, ModelSpec, RemoteStore, fetch, inspect_gguf

log = logging.getLogger("app")


def fetch_and_load(config: AppConfig, spec: ModelSpec, model_id: str, store: RemoteStore | None) -> Any:
    """The GGUF fetched, checked and loaded: the engine (app.engine.engine.LlamaEngine)."""
    from app.engine.engine import load_engine  # llama.cpp is imported here, off the start-up path

    path = fetch(spec, config.hf_token, store)
    log.info("model file: %s", inspect_gguf(path).summary())
    return load_engine(config.engine_settings(path, model_id, verbose=log.isEnabledFor(logging.DEBUG)))


class EarlyLoad:
    """A local run's model load, started before ClearML: the configuration comes from the command line, so the
    load need not wait for the SDK's import and offline session (about half a second of the cold start). Under an
    agent the task's values decide, and a ClearML model needs the SDK: no early load there."""

    def __init__(self, config: AppConfig, spec: ModelSpec, model_id: str) -> None:
        self.config = config
        self.spec = spec
        self.model_id = model_id
        self._done = threading.Event()
        self._engine: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="model-early-load", daemon=True)

    @classmethod
    def start(cls, config: AppConfig) -> EarlyLoad | None:
        spec = config.model_spec()
        if spec.kind == "clearml" or config.rpc_worker_tasks:
            return None
        early = cls(config, spec, config.served_name)
        early._thread.start()
        return early

    def _run(self) -> None:
        try:
            self._engine = fetch_and_load(self.config, self.spec, self.model_id, None)
        except BaseException as exc:  # handed to the loader, which reports it like its own
            self._error = exc
        finally:
            self._done.set()

    def matches(self, config: AppConfig) -> bool:
        return config == self.config

    def result(self) -> Any:
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._engine

    def discard(self) -> None:
        """The run ended before the loader took the engine: free it once loaded."""
        self._done.wait()
        if self._engine is not None:
            self._engine.close()
            self._engine = None


class ModelLoader:
    """Owns the loader thread; `start()` and `join()` are its whole lifecycle."""

    def __init__(self, config: AppConfig, spec: ModelSpec, model_id: str, lifecycle: Lifecycle,
                 store: RemoteStore | None, on_loaded: Callable[[], None], gpus: Callable[[], int],
                 on_gpu_offload: Callable[[str], object], early: EarlyLoad | None = None,
                 rpc_workers: Callable[[list[str]], list[str]] | None = None) -> None:
        self.early = early
        self.rpc_workers = rpc_workers  # RPC worker task IDs -> the endpoints they publish (ClearML; waits)
        self.config = config
        self.spec = spec
        self.model_id = model_id
        self.lifecycle = lifecycle
        self.store = store
        self.on_loaded = on_loaded  # runs just before the app turns ready (the idle clock starts there)
        self.gpus = gpus  # how many GPUs this machine has (NVML, through the hardware sampler)
        self.on_gpu_offload = on_gpu_offload  # what the task's "GPU offload" property should say
        self._thread = threading.Thread(target=self._load, name="model-loader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _load(self) -> None:
        from app.engine.model import gpu_offload_problem

        try:
            gpus = self.gpus()
            problem = gpu_offload_problem(self.config.n_gpu_layers, gpus)
            if problem:
                log.error("GPU offload: %s", problem)
            elif gpus == 0:
                problem = "no GPU on this machine: CPU only"
            elif self.config.n_gpu_layers == 0:
                problem = "off: Number of GPU Layers is 0"
            self.on_gpu_offload(problem or f"up to {self.config.n_gpu_layers} layers on {gpus} GPU(s)")
            self.config = self._with_worker_endpoints(self.config)
            if self.early is not None and self.early.matches(self.config):
                engine = self.early.result()
            else:
                if self.early is not None:
                    self.early.discard()  # loaded for another configuration: not kept beside this one
                engine = fetch_and_load(self.config, self.spec, self.model_id, self.store)
        except ModelSourceError as exc:
            self.lifecycle.fail(str(exc))
            return
        except Exception as exc:  # a load failure must end the run with its cause, not hang it
            log.debug("model load failed", exc_info=True)
            self.lifecycle.fail(f"model load failed: {exc}")
            return
        self.on_loaded()
        for device in getattr(getattr(engine, "model", None), "devices", None) or []:
            log.info("device %s %s: %d layers", device["device"], device["description"], device["layers"])
        if not self.lifecycle.ready(engine):
            return  # a stop came first: main closes the engine
        log.info("ready: serving %s", self.model_id)

    def _with_worker_endpoints(self, config: AppConfig) -> AppConfig:
        """The configuration with the endpoints its RPC worker tasks published added to rpc_servers."""
        ids = [t for t in config.rpc_worker_tasks.split(",") if t]
        if not ids:
            return config
        if self.rpc_workers is None:
            raise ModelSourceError("rpc_worker_tasks: RPC worker tasks are found through ClearML, and this run has "
                                   "no ClearML task (give rpc_servers as host:port instead)")
        log.info("waiting for %d RPC worker task(s) to publish their endpoints", len(ids))
        try:
            found = self.rpc_workers(ids)
        except (RuntimeError, TimeoutError) as exc:
            raise ModelSourceError(f"RPC workers: {exc}") from None
        given = [s for s in config.rpc_servers.split(",") if s]
        servers = given + [e for e in found if e not in given]
        return config.model_copy(update={"rpc_servers": ",".join(servers)})
