"""Make megatron-core run on CPU (gloo). Applied only when CUDA is absent.

megatron-core assumes CUDA in ~100 places: literal ``device="cuda"`` tensors, ``torch.cuda.*``
calls for devices, streams, events and RNG, and ``Tensor.type()`` checks against
``torch.cuda.FloatTensor``. Rather than patching each call site (brittle across mcore
versions), three narrow mechanisms cover them all:

1. ``_CudaToCpu``, a TorchFunctionMode that rewrites any CUDA device argument of a torch call
   (factories, ``Tensor.to``/``.cuda()``) to CPU, and answers ``Tensor.type()`` with the CUDA
   type name mcore's optimizer and grad-clipping asserts expect.
2. ``torch.cuda`` shims: device/stream/event/synchronize/memory calls become CPU no-ops and
   the CUDA RNG calls act on the CPU generator, so mcore's RNG tracker (needed even with
   dropout 0) forks and restores a real state.
3. The mcore functions that bypass the above: the tracker's private CUDA RNG helpers.

Nothing here runs on a machine with a GPU: ``apply()`` refuses when CUDA is available.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch.overrides import TorchFunctionMode

_applied = False
_lock = threading.Lock()

# Tensor.type() strings mcore compares against (optimizer.py, distrib_optimizer.py, clip_grads.py).
_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


def _is_cuda_device(d) -> bool:
    if isinstance(d, torch.device):
        return d.type == "cuda"
    if isinstance(d, str):
        return d.startswith("cuda")
    # A bare int is a CUDA ordinal for torch factories (device=torch.cuda.current_device()).
    return isinstance(d, int) and not isinstance(d, bool)


class _CudaToCpu(TorchFunctionMode):
    """Redirects CUDA device arguments to CPU for every torch call made under it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # mcore asserts grads/params are 'torch.cuda.*Tensor'; answer as a CUDA build would.
            return _CUDA_TYPE_NAMES.get(args[0].dtype, torch.Tensor.type(args[0]))
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _NoopStream:
    """Stands in for torch.cuda.Stream/Event: CPU ops are synchronous, so these do nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __getattr__(self, name):
        return lambda *a, **k: None

    def elapsed_time(self, other) -> float:
        return 0.0

    def query(self) -> bool:
        return True


def _cpu_rng_state(*args, **kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(state, *args, **kwargs) -> None:
    torch.set_rng_state(state)


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    # Devices: mcore passes current_device() as `device=`; the TorchFunctionMode maps the int to CPU.
    cuda.current_device = lambda: 0
    cuda.set_device = lambda *a, **k: None
    cuda.device_count = lambda: 0
    # Synchronisation, streams, events: CPU kernels are synchronous.
    cuda.synchronize = lambda *a, **k: None
    cuda.Stream = _NoopStream
    cuda.Event = _NoopStream
    cuda.current_stream = lambda *a, **k: _NoopStream()
    cuda.default_stream = lambda *a, **k: _NoopStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    # Memory bookkeeping (timers/loggers call these).
    cuda.empty_cache = lambda: None
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.reset_peak_memory_stats = lambda *a, **k: None
    # NVTX ranges used by mcore's profiling hooks.
    cuda.nvtx.range_push = lambda *a, **k: None
    cuda.nvtx.range_pop = lambda *a, **k: None
    # RNG: the CUDA generator does not exist; the model-parallel tracker forks the CPU one.
    cuda.get_rng_state = _cpu_rng_state
    cuda.set_rng_state = _set_cpu_rng_state
    # torch.manual_seed itself calls cuda.manual_seed_all: seed the CPU generator directly.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None
    cuda.random.get_rng_state = _cpu_rng_state
    cuda.random.set_rng_state = _set_cpu_rng_state


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    # The tracker's private helpers index torch.cuda.default_generators directly.
    mrandom._get_cuda_rng_state = _cpu_rng_state
    mrandom._set_cuda_rng_state = _set_cpu_rng_state

    # Pipeline p2p: gloo matches messages between two ranks by (peer, tag) in posting order, and
    # mcore posts send_prev before send_next while the receiver posts recv_prev before recv_next.
    # With PP=2 (prev == next rank) and interleaving, activations and gradients of equal shape
    # then swap silently. NCCL's grouped calls don't have this problem; on gloo, tag each
    # direction so a message can only match its own kind.
    from megatron.core.pipeline_parallel import p2p_communication

    p2p_communication._batched_p2p_ops = _tagged_batched_p2p_ops
    # The same for the shapes sent ahead of activations whose shapes vary within a step
    # (variable_seq_lengths: token-budget and packed micro-batches with PP > 1).
    p2p_communication.P2PCommunicator._communicate_shapes = _tagged_communicate_shapes

    # The causal mask is built with a literal device="cuda". In the forward the mode above
    # redirects it; recomputation (model.recompute) re-runs the forward inside autograd's
    # backward, where the mode is not active: build the CPU mask directly.
    import functools

    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as tutils

    @functools.lru_cache(maxsize=None)
    def get_default_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, device="cpu"), diagonal=1).bool()

    tutils.get_default_causal_mask = get_default_causal_mask
    fused_softmax.get_default_causal_mask = get_default_causal_mask


_FORWARD_TAG, _BACKWARD_TAG = 1, 2


def _tagged_batched_p2p_ops(
    *, tensor_send_prev, tensor_recv_prev, tensor_send_next, tensor_recv_next, group, prev_pipeline_rank, next_pipeline_rank
):
    import torch.distributed as dist

    ops = []
    for tensor, op, peer, tag in (
        (tensor_send_prev, dist.isend, prev_pipeline_rank, _BACKWARD_TAG),
        (tensor_recv_prev, dist.irecv, prev_pipeline_rank, _FORWARD_TAG),
        (tensor_send_next, dist.isend, next_pipeline_rank, _FORWARD_TAG),
        (tensor_recv_next, dist.irecv, next_pipeline_rank, _BACKWARD_TAG),
    ):
        if tensor is not None:
            ops.append(dist.P2POp(op, tensor, peer, group, tag))
    return dist.batch_isend_irecv(ops) if ops else []


def _tagged_communicate_shapes(self, tensor_send_next, tensor_send_prev, recv_prev, recv_next):
    """megatron-core's P2PCommunicator._communicate_shapes (0.16) with tagged messages: each
    activation's [seq, batch, hidden] as 3 int64, received into [0, 0, 0] where none comes."""
    def shape(t):
        return None if t is None else torch.tensor(t.size(), dtype=torch.int64)

    recv_prev_shape = torch.zeros(3, dtype=torch.int64) if recv_prev else None
    recv_next_shape = torch.zeros(3, dtype=torch.int64) if recv_next else None
    reqs = _tagged_batched_p2p_ops(
        tensor_send_prev=shape(tensor_send_prev), tensor_recv_prev=recv_prev_shape,
        tensor_send_next=shape(tensor_send_next), tensor_recv_next=recv_next_shape,
        group=self.pp_group, prev_pipeline_rank=self.prev_rank, next_pipeline_rank=self.next_rank,
    )
    for req in reqs:
        req.wait()
    as_list = lambda t: [0, 0, 0] if t is None else t.tolist()  # noqa: E731
    return as_list(recv_prev_shape), as_list(recv_next_shape)


_mode: _CudaToCpu | None = None


def apply() -> bool:
    """Install the patches in this process if CUDA is absent. Returns whether they are active."""
    global _applied, _mode
    if torch.cuda.is_available():
        return False
    with _lock:
        if _applied:
            return True
        _patch_torch_cuda()
        _patch_megatron()
        _mode = _CudaToCpu()
        _mode.__enter__()  # process-wide for the main thread, for the life of the process
        _applied = True
    return True



_adam_fixed = False


def apply_torch_adam_fixes() -> None:
    """Without apex/TE, megatron-core falls back to torch's Adam (CPU, or a bare GPU image).
    Its per-parameter 'step' state is stored per param group in the fully reshardable
    distributed-optimizer checkpoint, and mcore's loader then looks for it per parameter
    (KeyError 'step'). Copy the parameter's own step onto itself there; mcore restores the
    real step from the param groups right after. A no-op when apex or TE is present.

    That restore gives every parameter the *same* 'step' tensor, and torch's Adam increments
    each parameter's step in place, so after one update the shared step had advanced once per
    parameter and bias correction was wrong: the first update after a resume differed from an
    uninterrupted run. Give each parameter its own copy after the load."""
    global _adam_fixed
    from megatron.core.optimizer import distrib_optimizer as dopt

    if _adam_fixed or dopt.HAVE_APEX_OR_TE:
        return
    original = dopt.DistributedOptimizer._set_main_param_and_optimizer_states

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if "step" not in tensors:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            step = self.optimizer.state.get(main_param, {}).get("step")
            if step is not None:
                tensors = dict(tensors, step=step)
        return original(self, model_param, tensors)

    dopt.DistributedOptimizer._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
    original_load = dopt.DistributedOptimizer.load_state_dict

    def load_state_dict(self, state_dict):
        original_load(self, state_dict)
        for state in self.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()

    dopt.DistributedOptimizer.load_state_dict = load_state_dict
    _adam_fixed = True
