"""Push the trainer's weights into the running vLLM server, and measure how far they agree.

`WeightSync.push(named_tensors)` takes HF-named, HF-shaped (unpadded vocab) full tensors -
what `hf_mapping.export_hf_weights` yields on rank 0 - and loads them into the server's
workers through the WeightReceiver extension, in buckets of about `bucket_bytes`:

    /pause -> begin_update -> bucket 1..k -> finish_update -> /reset_prefix_cache -> /resume

Transports: "http" (safetensors bytes, base64 in the /collective_rpc JSON body: works
everywhere, incl. a server on another node), "shm" (a safetensors file in /dev/shm: same
host only, skips base64 and JSON), and the collective transports "nccl" (GPUs) and "gloo"
(CPU, or GPUs without NCCL between the nodes): one code path, a broadcast from the trainer
to every vLLM worker over a process group made with vLLM's
`stateless_init_torch_distributed_process_group` (it leaves both sides' global
torch.distributed state alone); call connect() once after the server is up, and again after
it restarts. Only rank 0 calls push().

`logprob_gap` is the train/rollout consistency metric to log every step.
"""
from __future__ import annotations

import base64
import os
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterable, Iterator

import torch

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
    """Loads trainer weights into `server`'s workers. See the module docstring.

    pause_mode: what /pause does to requests in flight - "wait" lets them finish on the old
    weights (default), "abort" drops them, "keep" freezes them and continues them on the new
    weights. strict: raise if some vLLM parameter received nothing (a naming bug would
    otherwise leave stale weights in the sampler silently).
    """

    def __init__(self, server: VLLMServer, transport: str = "http", bucket_bytes: int = 128 * 2**20,
                 shm_dir: str = "/dev/shm", pause_mode: str = "wait", strict: bool = True,
                 rpc_timeout: float = 600.0):
        if transport not in TRANSPORTS:
            raise ValueError(f"WeightSync transport={transport!r}: must be one of {TRANSPORTS}")
        self.server = server
        self.transport = transport
        self.bucket_bytes = int(bucket_bytes)
        self.shm_dir = shm_dir
        self.pause_mode = pause_mode
        self.strict = strict
        self.rpc_timeout = rpc_timeout
        self._group = None  # trainer side of the collective transport (rank 0)
        self._device = torch.device("cpu")

    # ------------------------------------------------------------------ collective setup
    def connect(self, master_address: str, master_port: int, timeout_s: float = 600.0) -> None:
        """Create the trainer<->workers group of a collective transport: this process is
        rank 0, the server's workers 1..W. `master_address` must be reachable from the
        server's workers (this host's address when vLLM runs on other nodes); master_port 0
        picks a free one. Both sides join at once, so the workers' rpc runs in a thread while
        we join here. Calling it again (after a server restart) replaces the old group."""
        import socket
        from datetime import timedelta

        from vllm.distributed.utils import stateless_init_torch_distributed_process_group

        if self.transport not in COLLECTIVE:
            raise ValueError(f"connect() is for the collective transports {COLLECTIVE}, not {self.transport!r}")
        self.close()
        workers = len(self.server.collective_rpc("worker_info"))
        # Rank 0's store listens on a socket bound here and handed over: no port race (port 0
        # picks a free one), and no rendezvous, which under torchrun would make rank 0 a
        # client of torchrun's agent store (TORCHELASTIC_USE_AGENT_STORE) and time out.
        listen = socket.create_server((master_address, int(master_port)))
        port = listen.getsockname()[1]
        with ThreadPoolExecutor(1) as pool:
            remote = pool.submit(self.server.collective_rpc, "init_weight_update_group",
                                 kwargs=dict(master_address=master_address, master_port=port,
                                             rank_offset=1, world_size=1 + workers, backend=self.transport,
                                             timeout_s=timeout_s),
                                 timeout=timeout_s)
            try:
                self._group = stateless_init_torch_distributed_process_group(
                    master_address, port, 0, 1 + workers, self.transport, listen_socket=listen,
                    timeout=timedelta(seconds=timeout_s))
            finally:
                listen.close()  # a no-op once the store took (detached) the descriptor
            remote.result()
        self._device = torch.device("cuda", torch.cuda.current_device()) if self.transport == "nccl" \
            else torch.device("cpu")

    def close(self) -> None:
        """Drop the trainer's side of the collective group (the server's died with it or
        is replaced by the next connect())."""
        group, self._group = self._group, None
        if group is not None:
            try:
                group.shutdown()
            except Exception:  # noqa: BLE001 - a group whose peers are gone may refuse
                pass

    # ------------------------------------------------------------------ push
    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, Any]:
        """Load the named tensors into the server; returns metrics (duration_s, bytes,
        buckets, tensors, gbps). Generation is paused meanwhile."""
        if self.transport in COLLECTIVE and self._group is None:
            raise RuntimeError(f"WeightSync(transport={self.transport!r}): call connect() before push()")
        t0 = time.perf_counter()
        stats = {"bytes": 0, "buckets": 0, "tensors": 0}
        server = self.server
        cleanup: list[str] = []  # shm files to remove whatever happens
        server.pause(self.pause_mode)
        try:
            server.collective_rpc("begin_update", timeout=self.rpc_timeout)
            # One rpc in flight while the next bucket is serialised.
            with ThreadPoolExecutor(1) as rpc:
                inflight: Future | None = None
                for bucket in buckets(named_tensors, self.bucket_bytes):
                    send = self._prepare(bucket, cleanup)
                    if inflight is not None:
                        inflight.result()
                    inflight = rpc.submit(send)
                    stats["buckets"] += 1
                    stats["tensors"] += len(bucket)
                    stats["bytes"] += sum(t.numel() * t.element_size() for _, t in bucket)
                    if self.transport in COLLECTIVE:  # the rpc blocks in broadcast until we send
                        self._broadcast(bucket)
                if inflight is not None:
                    inflight.result()
            report = server.collective_rpc("finish_update", timeout=self.rpc_timeout)
        except BaseException as e:
            self._recover()
            if isinstance(e, RolloutServerError):
                raise RolloutServerError(
                    f"weight sync failed after {stats['buckets']} bucket(s); the server's weights "
                    f"may be partly updated: {e}") from e
            raise
        finally:
            for path in cleanup:
                _unlink(path)
        server.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        server.resume()
        stats["duration_s"] = time.perf_counter() - t0
        stats["gbps"] = stats["bytes"] / 1e9 / max(stats["duration_s"], 1e-9)
        not_updated = sorted({n for r in report for n in (r or {}).get("not_updated", [])})
        stats["not_updated"] = not_updated
        if self.strict and not_updated:
            raise RolloutServerError(
                f"weight sync to {server.describe()} left {len(not_updated)} vLLM parameter(s) "
                f"without new values (names not matching the HF checkpoint?): {not_updated[:20]}")
        return stats

    def _prepare(self, bucket: list[tuple[str, torch.Tensor]], cleanup: list[str]):
        """Serialise one bucket; returns the call that ships it."""
        rpc, timeout = self.server.collective_rpc, self.rpc_timeout
        if self.transport == "http":
            from safetensors.torch import save

            # The JSON body is assembled by hand: base64 needs no escaping, and json.dumps
            # of a ~100 MB string costs about as much as the rest of the trip.
            data = base64.b64encode(save(_cpu_tensors(bucket)))
            body = b'{"method": "receive_bucket", "args": ["' + data + b'"], "kwargs": {}, "timeout": ' \
                + str(float(timeout)).encode() + b"}"
            return lambda: self.server.post("/collective_rpc", data=body, timeout=timeout + 30)
        if self.transport == "shm":
            from safetensors.torch import save_file

            path = os.path.join(self.shm_dir, f"tbrm-weights-{uuid.uuid4().hex}.safetensors")
            cleanup.append(path)
            save_file(_cpu_tensors(bucket), path)

            def send():
                try:
                    return rpc("receive_bucket_file", args=[path], timeout=timeout)
                finally:
                    _unlink(path)
            return send
        meta = dict(names=[n for n, _ in bucket],
                    dtypes=[str(t.dtype).removeprefix("torch.") for _, t in bucket],
                    shapes=[list(t.shape) for _, t in bucket])
        return lambda: rpc("receive_bucket_broadcast", kwargs=meta, timeout=timeout)

    def _broadcast(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        for _, t in bucket:
            self._group.broadcast(t.detach().to(self._device).contiguous(), root=0).wait()

    def _recover(self) -> None:
        """Best effort after a failed push: close the worker's session (untouched modules get
        their old tensors back) and let generation run again."""
        for call in (lambda: self.server.collective_rpc("finish_update", timeout=60),
                     self.server.reset_prefix_cache, self.server.resume):
            try:
                call()
            except Exception:
                pass


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
