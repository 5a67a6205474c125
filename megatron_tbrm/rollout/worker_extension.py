"""vLLM worker extension that receives trainer weights (`--worker-extension-cls`).

vLLM mixes this class into its worker, so `self` is the worker (`self.model_runner`,
`self.vllm_config`, `self.device`, `self.rank`); its methods are called through the
server's POST /collective_rpc. Arguments arrive as JSON values, so tensors travel as
safetensors bytes (base64), as a safetensors file path (/dev/shm), or by broadcast over
a gloo/NCCL group shared with the trainer.

One update is a session: begin_update(), any number of receive_bucket*() calls, then
finish_update(). Why a session and not one `model_runner.reload_weights(weights_iterator=...)`
per bucket: reload_weights() runs vLLM's layerwise reload, which materialises each vLLM
module afresh and processes it (CPU: repacks linear weights) once all of its elements are
loaded; a module still partly loaded at the end is processed anyway with uninitialised
memory in the missing part. Fused modules (qkv_proj <- q/k/v_proj, gate_up_proj <-
gate/up_proj) split across two buckets would come out corrupted. The session calls the same
three steps reload_weights() does (initialize_layerwise_reload, model.load_weights,
finalize_layerwise_reload), spread over the buckets, so vLLM buffers a module's pieces
across buckets and processes it once complete. Never write param.data directly: on CPU vLLM
computes from prepacked copies, so such writes change nothing.
"""
from __future__ import annotations

import base64
from typing import Any

import torch


class WeightReceiver:
    # State lives on the worker instance; attribute names are prefixed so they cannot clash
    # with vLLM's own worker attributes (vLLM asserts on method-name clashes only).
    _tbrm_session: dict[str, Any] | None = None
    _tbrm_group: Any = None  # the trainer's broadcast group (collective transport)
    _tbrm_group_device: Any = None

    # ------------------------------------------------------------------ session
    def begin_update(self) -> None:
        """Start a weight update: vLLM's layerwise reload state is set up on the model.
        Generation must be paused until finish_update() (modules are on meta meanwhile)."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        if self._tbrm_session is not None:
            # A previous session died half-way (trainer crash): close it so untouched
            # modules get their kernel tensors back before starting anew.
            self.finish_update()
        model = self.model_runner.get_model()
        with set_current_vllm_config(self.vllm_config), torch.no_grad():
            initialize_layerwise_reload(model)
        self._tbrm_session = {"loaded": set(), "tensors": 0, "bytes": 0}

    def _load(self, named_tensors) -> int:
        """Feed (hf_name, tensor) pairs to the model's own loader (renames, fuses, pads
        the vocab, shards for TP)."""
        from vllm.config import set_current_vllm_config

        if self._tbrm_session is None:
            raise RuntimeError("WeightReceiver: begin_update() must be called before receiving weights")
        named_tensors = list(named_tensors)
        model = self.model_runner.get_model()
        with set_current_vllm_config(self.vllm_config), torch.no_grad():
            loaded = model.load_weights(iter(named_tensors))
        if loaded:
            self._tbrm_session["loaded"].update(loaded)
        self._tbrm_session["tensors"] += len(named_tensors)
        self._tbrm_session["bytes"] += sum(t.numel() * t.element_size() for _, t in named_tensors)
        return len(named_tensors)

    def receive_bucket(self, data_b64: str) -> int:
        """One bucket as base64 safetensors bytes (the HTTP transport). Returns #tensors."""
        from safetensors.torch import load

        return self._load(load(base64.b64decode(data_b64)).items())

    def receive_bucket_file(self, path: str) -> int:
        """One bucket as a safetensors file, e.g. in /dev/shm (same-host transport)."""
        from safetensors.torch import load_file

        return self._load(load_file(path, device="cpu").items())

    def finish_update(self) -> dict[str, Any]:
        """Process the modules still pending, restore untouched ones, drop derived caches.
        Returns what was loaded and which vLLM parameters received nothing."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        session, self._tbrm_session = self._tbrm_session, None
        if session is None:
            raise RuntimeError("WeightReceiver: finish_update() without begin_update()")
        model = self.model_runner.get_model()
        unloaded = _modules_without_weights(model)
        with set_current_vllm_config(self.vllm_config), torch.no_grad():
            finalize_layerwise_reload(model, self.model_config)
            stale = _reprocess_tied(model, unloaded)
        # What GPUModelRunner.reload_weights() resets after loading.
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
            fn = getattr(self.model_runner, reset, None)
            if fn is not None:
                fn()
        params = {name for name, _ in model.named_parameters()}
        return {
            "tensors": session["tensors"],
            "bytes": session["bytes"],
            "not_updated": sorted((params - session["loaded"]) | {f"{name} (module)" for name in stale}),
        }

    def worker_info(self) -> dict[str, Any]:
        """Cheap probe: proves the extension is loaded and says where the worker runs."""
        return {"rank": int(self.rank), "device": str(self.device), "update_active": self._tbrm_session is not None}

    # ------------------------------------------------------------------ collective transport
    def init_weight_update_group(self, master_address: str, master_port: int, rank_offset: int,
                                 world_size: int, backend: str = "nccl", timeout_s: float = 600.0) -> None:
        """Join the trainer's broadcast group ("nccl" on GPUs, "gloo" anywhere): trainer rank
        0 sends, this worker takes rank `rank_offset + its global vLLM rank`. Made with
        vLLM's stateless process group, so vLLM's own groups are untouched; the trainer
        creates its side at the same time. A second call replaces the group."""
        from datetime import timedelta

        from vllm.distributed.utils import stateless_init_torch_distributed_process_group

        self.destroy_weight_update_group()
        pc = self.vllm_config.parallel_config
        rank = rank_offset + pc.data_parallel_index * pc.world_size + self.rank
        self._tbrm_group = stateless_init_torch_distributed_process_group(
            master_address, int(master_port), rank, int(world_size), backend, timeout=timedelta(seconds=timeout_s))
        self._tbrm_group_device = self.device if backend == "nccl" else torch.device("cpu")

    def receive_bucket_broadcast(self, names: list[str], dtypes: list[str], shapes: list[list[int]]) -> int:
        """Receive one bucket broadcast by trainer rank 0 (same order) and load it."""
        if self._tbrm_group is None:
            raise RuntimeError("WeightReceiver: init_weight_update_group() was not called")
        tensors = []
        for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
            t = torch.empty(shape, dtype=getattr(torch, dtype), device=self._tbrm_group_device)
            self._tbrm_group.broadcast(t, root=0).wait()
            tensors.append((name, t))
        return self._load(tensors)

    def destroy_weight_update_group(self) -> None:
        group, self._tbrm_group = self._tbrm_group, None
        if group is not None:
            try:
                group.shutdown()
            except Exception:  # noqa: BLE001 - the trainer's side may be gone already
                pass


def _modules_without_weights(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Modules that expect weights in this reload but received none. vLLM's finalize puts
    their old tensors back and only logs "Failed to load weights": call it before finalize."""
    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

    out = {}
    for name, module in model.named_modules():
        info = LAYERWISE_INFO.get(module)
        if info is not None and info.can_load() and info.load_numel <= 0 and info.load_numel_total > 0:
            out[name] = module
    return out


def _reprocess_tied(model: torch.nn.Module, unloaded: dict[str, torch.nn.Module]) -> list[str]:
    """Bring modules that received no weights up to date when every tensor they hold is
    shared with a module that did (tied embeddings: lm_head.weight IS embed_tokens.weight,
    and vLLM loads it once, through embed_tokens). The shared storage already holds the new
    values, but what the module derived from it at load time does not: on CPU the LM head
    keeps a prepacked GEMM copy, so the sampler would use the new input embedding with the
    OLD output layer. Re-running the module's weight processing rebuilds those copies.
    Returns the names of modules left stale (tensors of their own that nobody loaded)."""
    loaded_ids = {id(p) for m in model.modules() if all(m is not u for u in unloaded.values())
                  for p in m.parameters(recurse=False)}
    stale = []
    for name, module in unloaded.items():
        own = list(module.parameters(recurse=False))
        if not own:  # derived buffers only (e.g. a rotary cache): nothing to receive
            continue
        if all(id(p) in loaded_ids for p in own):
            quant_method = getattr(module, "quant_method", None)
            if quant_method is not None:
                quant_method.process_weights_after_loading(module)
        else:
            stale.append(name)
    return stale
