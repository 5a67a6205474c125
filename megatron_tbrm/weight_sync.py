"""Push the trainer's weights into the running vLLM engines, and measure how far they agree.

`WeightSync.push(named_tensors)` takes HF-named, HF-shaped (unpadded vocab) full tensors -
what `hf_mapping.export_hf_weights` yields on rank 0 - and loads them into every engine's
workers through the WeightReceiver extension, in buckets of about `bucket_bytes`, each step
on all engines at once:

    /pause -> begin_update -> bucket 1..k -> finish_update -> /reset_prefix_cache -> /resume

Transports: "http" (safetensors bytes, base64 in the /collective_rpc JSON body: works
everywhere, incl. a server on another node), "shm" (a safetensors file in /dev/shm, written
once per bucket and read by every engine: same host only, skips base64 and JSON), and the
collective transports "nccl" (GPUs) and "gloo" (CPU, or GPUs without NCCL between the nodes):
one code path, a broadcast from the trainer to every vLLM worker over a process group made
with vLLM's `stateless_init_torch_distributed_process_group` (it leaves both sides' global
torch.distributed state alone). Each engine has a group of its own (trainer + that engine's
workers): a group is made by its members only, one engine at a time, so no engine waits on
another to join (a group spanning all engines needs every engine in the rendezvous at once,
and a restarted engine would force all of them to rebuild it); the trainer sends each bucket
once per engine. Call connect() once after the engines are up, and again for an engine that
restarted. Only rank 0 calls push().

`logprob_gap` is the train/rollout consistency metric to log every step.
"""
from __future__ import annotations

import base64
import os
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterable, Iterator, Sequence

import torch

from megatron_tbrm.rollout.engines import each
from megatron_tbrm.rollout.server import RolloutServerError, VLLMServer

TRANSPORTS = ("http", "shm", "nccl", "gloo")
COLLECTIVE = ("nccl", "gloo")


def buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
            ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group tensors in order into lists of about `bucket_bytes` (a bigger tensor goes
    alone). Order is kept so that the pieces of one vLLM module arrive close together."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in named_tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket


def _cpu_tensors(bucket: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors that each own their storage (safetensors refuses shared or
    partial storage, e.g. tied embeddings or slices of a flat buffer)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in bucket:
        t = t.detach().to("cpu").contiguous()
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


class WeightSync:
    """Loads trainer weights into the workers of `servers` (one VLLMServer or several
    engines). See the module docstring.

    pause_mode: what /pause does to requests in flight - "wait" lets them finish on the old
    weights (default), "abort" drops them, "keep" freezes them and continues them on the new
    weights. strict: raise if some vLLM parameter received nothing (a naming bug would
    otherwise leave stale weights in the sampler silently).
    """

    def __init__(self, servers: VLLMServer | Sequence[VLLMServer], transport: str = "http",
                 bucket_bytes: int = 128 * 2**20, shm_dir: str = "/dev/shm", pause_mode: str = "wait",
                 strict: bool = True, rpc_timeout: float = 600.0):
        if transport not in TRANSPORTS:
            raise ValueError(f"WeightSync transport={transport!r}: must be one of {TRANSPORTS}")
        self.servers = [servers] if isinstance(servers, VLLMServer) else list(servers)
        self.transport = transport
        self.bucket_bytes = int(bucket_bytes)
        self.shm_dir = shm_dir
        self.pause_mode = pause_mode
        self.strict = strict
        self.rpc_timeout = rpc_timeout
        self._groups: list = [None] * len(self.servers)  # trainer side of each engine's group (rank 0)
        self._device = torch.device("cpu")

    # ------------------------------------------------------------------ collective setup
    def connect(self, master_address: str, master_port: int, timeout_s: float = 600.0,
                engines: Sequence[int] | None = None) -> None:
        """Create the trainer<->workers group of a collective transport for each of `engines`
        (indices; default all), one engine after the other: this process is rank 0, the
        engine's workers 1..W. `master_address` must be reachable from the workers (this host's
        address when vLLM runs on other nodes); master_port 0 picks a free one, else engine i
        uses master_port + i. Calling it again for an engine (after its restart) replaces its
        group."""
        if self.transport not in COLLECTIVE:
            raise ValueError(f"connect() is for the collective transports {COLLECTIVE}, not {self.transport!r}")
        for i in range(len(self.servers)) if engines is None else engines:
            self._close_group(i)
            self._groups[i] = self._join(self.servers[i], master_address, int(master_port) + i if master_port else 0,
                                         timeout_s)
        self._device = torch.device("cuda", torch.cuda.current_device()) if self.transport == "nccl" \
            else torch.device("cpu")

    def _join(self, server: VLLMServer, master_address: str, port: int, timeout_s: float):
        """One engine's group. Both sides join at once, so the workers' rpc runs in a thread
        while we join here."""
        import socket
        from datetime import timedelta

        from vllm.distributed.utils import stateless_init_torch_distributed_process_group

        workers = len(server.collective_rpc("worker_info"))
        # Rank 0's store listens on a socket bound here and handed over: no port race (port 0
        # picks a free one), and no rendezvous, which under torchrun would make rank 0 a
        # client of torchrun's agent store (TORCHELASTIC_USE_AGENT_STORE) and time out.
        listen = socket.create_server((master_address, port))
        port = listen.getsockname()[1]
        with ThreadPoolExecutor(1) as pool:
            remote = pool.submit(server.collective_rpc, "init_weight_update_group",
                                 kwargs=dict(master_address=master_address, master_port=port,
                                             rank_offset=1, world_size=1 + workers, backend=self.transport,
                                             timeout_s=timeout_s),
                                 timeout=timeout_s)
            try:
                group = stateless_init_torch_distributed_process_group(
                    master_address, port, 0, 1 + workers, self.transport, listen_socket=listen,
                    timeout=timedelta(seconds=timeout_s))
            finally:
                listen.close()  # a no-op once the store took (detached) the descriptor
            remote.result()
        return group

    def _close_group(self, i: int) -> None:
        group, self._groups[i] = self._groups[i], None
        if group is not None:
            try:
                group.shutdown()
            except Exception:  # noqa: BLE001 - a group whose peers are gone may refuse
                pass

    def close(self) -> None:
        """Drop the trainer's side of every collective group (the engines' died with them or
        are replaced by the next connect())."""
        for i in range(len(self.servers)):
            self._close_group(i)

    # ------------------------------------------------------------------ push
    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, Any]:
        """Load the named tensors into every engine; returns metrics (duration_s, bytes per
        engine, gbps over all engines, buckets, tensors, engines, not_updated). Generation is
        paused meanwhile. RolloutServerError names the engine that failed (its .server)."""
        if self.transport in COLLECTIVE and any(g is None for g in self._groups):
            raise RuntimeError(f"WeightSync(transport={self.transport!r}): call connect() before push()")
        t0 = time.perf_counter()
        stats = {"bytes": 0, "buckets": 0, "tensors": 0, "engines": len(self.servers)}
        servers = self.servers
        cleanup: list[str] = []  # shm files to remove whatever happens
        try:
            each(servers, lambda s: s.pause(self.pause_mode))
            each(servers, lambda s: s.collective_rpc("begin_update", timeout=self.rpc_timeout))
            # One bucket's rpcs (one per engine) in flight while the next bucket is serialised.
            with ThreadPoolExecutor(len(servers)) as rpc:
                inflight: list[Future] = []
                received = _nothing  # the previous bucket's cleanup, once every engine loaded it
                for bucket in buckets(named_tensors, self.bucket_bytes):
                    send, done = self._prepare(bucket, cleanup)
                    _wait(inflight)
                    received()
                    inflight, received = [rpc.submit(send, s) for s in servers], done
                    stats["buckets"] += 1
                    stats["tensors"] += len(bucket)
                    stats["bytes"] += sum(t.numel() * t.element_size() for _, t in bucket)
                    if self.transport in COLLECTIVE:  # each engine's rpc blocks in broadcast until we send
                        self._broadcast(bucket)
                _wait(inflight)
                received()
            reports = each(servers, lambda s: s.collective_rpc("finish_update", timeout=self.rpc_timeout))
        except BaseException as e:
            self._recover()
            if isinstance(e, RolloutServerError):
                raise RolloutServerError(
                    f"weight sync failed after {stats['buckets']} bucket(s); the engines' weights "
                    f"may be partly updated: {e}", server=e.server) from e
            raise
        finally:
            for path in cleanup:
                _unlink(path)
        each(servers, lambda s: s.reset_prefix_cache())  # cached KV blocks were computed with the old weights
        each(servers, lambda s: s.resume())
        stats["duration_s"] = time.perf_counter() - t0
        stats["gbps"] = stats["bytes"] * len(servers) / 1e9 / max(stats["duration_s"], 1e-9)
        not_updated = sorted({n for report in reports for r in report for n in (r or {}).get("not_updated", [])})
        stats["not_updated"] = not_updated
        if self.strict and not_updated:
            raise RolloutServerError(
                f"weight sync to {', '.join(s.describe() for s in servers)} left {len(not_updated)} vLLM "
                f"parameter(s) without new values (names not matching the HF checkpoint?): {not_updated[:20]}")
        return stats

    def _prepare(self, bucket: list[tuple[str, torch.Tensor]], cleanup: list[str]):
        """Serialise one bucket once; returns (send(server): the call that ships it to one
        engine, done(): what to run once every engine has it)."""
        timeout = self.rpc_timeout
        if self.transport == "http":
            from safetensors.torch import save

            # The JSON body is assembled by hand: base64 needs no escaping, and json.dumps
            # of a ~100 MB string costs about as much as the rest of the trip.
            data = base64.b64encode(save(_cpu_tensors(bucket)))
            body = b'{"method": "receive_bucket", "args": ["' + data + b'"], "kwargs": {}, "timeout": ' \
                + str(float(timeout)).encode() + b"}"
            return (lambda server: server.post("/collective_rpc", data=body, timeout=timeout + 30)), _nothing
        if self.transport == "shm":
            from safetensors.torch import save_file

            path = os.path.join(self.shm_dir, f"tbrm-weights-{uuid.uuid4().hex}.safetensors")
            cleanup.append(path)
            save_file(_cpu_tensors(bucket), path)
            return (lambda server: server.collective_rpc("receive_bucket_file", args=[path], timeout=timeout)), \
                (lambda: _unlink(path))  # read by every engine: removed once all have it
        meta = dict(names=[n for n, _ in bucket],
                    dtypes=[str(t.dtype).removeprefix("torch.") for _, t in bucket],
                    shapes=[list(t.shape) for _, t in bucket])
        return (lambda server: server.collective_rpc("receive_bucket_broadcast", kwargs=meta, timeout=timeout)), \
            _nothing

    def _broadcast(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        """Each tensor to each engine's group in turn: engine i's workers wait in their own
        group only, so the order cannot deadlock."""
        for _, t in bucket:
            t = t.detach().to(self._device).contiguous()
            for group in self._groups:
                group.broadcast(t, root=0).wait()

    def _recover(self) -> None:
        """Best effort after a failed push, on every engine: close the worker's session
        (untouched modules get their old tensors back) and let generation run again."""
        def recover(server: VLLMServer) -> None:
            for call in (lambda: server.collective_rpc("finish_update", timeout=60),
                         server.reset_prefix_cache, server.resume):
                try:
                    call()
                except Exception:
                    pass
        each(self.servers, recover)


def _nothing() -> None:
    pass


def _wait(futures: list[Future]) -> None:
    """Wait for all, then raise the first error (no rpc left running behind a failure)."""
    for f in futures:
        f.exception()
    for f in futures:
        f.result()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def logprob_gap(sampler_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean |sampler - trainer| log-prob over response tokens (mask != 0): how far the
    rollout policy is from the policy the trainer thinks it sampled from (stale or broken
    weight sync, precision, kernels). Shapes [batch, seq]; computed in fp64."""
    if sampler_logprobs.shape != trainer_logprobs.shape or sampler_logprobs.shape != mask.shape:
        raise ValueError(f"logprob_gap: shapes differ: sampler {tuple(sampler_logprobs.shape)}, "
                         f"trainer {tuple(trainer_logprobs.shape)}, mask {tuple(mask.shape)}")
    keep = mask.bool()
    diff = (sampler_logprobs.to(torch.float64) - trainer_logprobs.to(torch.float64)).abs()
    diff = torch.where(keep, diff, 0.0)  # padding may hold -inf/nan: select, don't multiply
    return float(diff.sum() / keep.sum().clamp_min(1))
