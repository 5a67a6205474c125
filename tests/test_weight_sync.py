"""Weight sync into a real vLLM CPU server, checked against an independent reference:
transformers' float32 forward of the same perturbed weights on the same tokens."""
from __future__ import annotations

import os

import psutil
import pytest
import torch

from megatron_tbrm.rollout import RolloutClient, RolloutServerError
from megatron_tbrm.ports import free_port
from megatron_tbrm.rollout.process import group_members
from megatron_tbrm.weight_sync import WeightSync, buckets, logprob_gap

from _vllm import vllm_server

PROMPT = [5, 17, 33, 101, 250, 7, 64, 300]
RESPONSE = [12, 99, 140, 3, 77, 210, 45, 8, 400, 31]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with vllm_server(tiny_model_dir, tmp_path_factory.mktemp("vllm-sync"), max_num_seqs=8) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return RolloutClient.for_server(server, timeout=120, retries=1)


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@torch.no_grad()
def hf_logprobs(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """Reference: log_softmax of transformers' logits at the positions predicting `response`."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0].to(torch.float64)
    logp = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)
    return logp.gather(-1, torch.tensor(response)[:, None])[:, 0]


@torch.no_grad()
def perturb(model, seed: int, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * scale)


def test_buckets_split_by_size():
    ts = [(f"t{i}", torch.zeros(10)) for i in range(5)]  # 40 bytes each
    assert [len(b) for b in buckets(ts, 100)] == [2, 2, 1]
    assert [len(b) for b in buckets([("big", torch.zeros(100))] + ts[:1], 100)] == [1, 1]


def test_logprob_gap_is_masked_mean_abs_diff():
    a = torch.tensor([[-1.0, -2.0, float("-inf")], [-0.5, -0.5, -0.5]])
    b = torch.tensor([[-1.5, -1.0, 0.0], [-0.5, -0.25, -9.0]])
    m = torch.tensor([[1, 1, 0], [1, 1, 0]])
    assert logprob_gap(a, b, m) == pytest.approx((0.5 + 1.0 + 0.0 + 0.25) / 4)
    with pytest.raises(ValueError, match="shapes differ"):
        logprob_gap(a, b[:, :2], m)


@pytest.mark.parametrize("transport,seed", [("http", 1), ("shm", 2)])
def test_sync_matches_transformers(server, client, hf_model, transport, seed):
    before = torch.tensor(client.score_logprobs(PROMPT, RESPONSE), dtype=torch.float64)
    perturb(hf_model, seed)
    ref = hf_logprobs(hf_model, PROMPT, RESPONSE)
    # 32 KiB buckets: every weight matrix alone, so q/k/v_proj (fused into qkv_proj in vLLM)
    # and gate/up_proj arrive in different buckets.
    sync = WeightSync(server, transport=transport, bucket_bytes=32 * 2**10)
    metrics = sync.push(hf_model.state_dict().items())
    assert metrics["buckets"] > 10 and metrics["bytes"] > 0 and metrics["duration_s"] > 0
    assert metrics["not_updated"] == []
    after = torch.tensor(client.score_logprobs(PROMPT, RESPONSE), dtype=torch.float64)
    assert (after - ref).abs().max() < 1e-4, (after - ref).abs().max()
    assert (after - before).abs().max() > 0.05  # the sync changed something visible


def test_sampler_logprobs_follow_synced_weights(server, client, hf_model):
    """What the trainer logs each step: sampled tokens' log-probs vs its own, after a sync."""
    trajs = client.generate([PROMPT, PROMPT[:4]], n=2, max_tokens=12, seed=3, progress=False,
                            extra={"ignore_eos": True})
    for t in trajs:
        ref = hf_logprobs(hf_model, t.prompt_token_ids, t.response_token_ids)
        got = torch.tensor(t.response_logprobs, dtype=torch.float64)
        assert logprob_gap(got[None], ref[None], torch.ones(1, len(ref))) < 1e-4


def test_missing_and_unknown_names_are_reported(server, client, hf_model):
    state = hf_model.state_dict()
    sync = WeightSync(server, transport="http")
    only_norm = [(k, v) for k, v in state.items() if k == "model.norm.weight"]
    with pytest.raises(RolloutServerError, match="without new values.*qkv_proj"):
        sync.push(only_norm)
    with pytest.raises(RolloutServerError, match="weight sync failed"):
        sync.push([("model.layers.0.no_such_module.weight", torch.zeros(4))])
    # The server still serves the last good weights after the failures.
    got = torch.tensor(client.score_logprobs(PROMPT, RESPONSE), dtype=torch.float64)
    assert (got - hf_logprobs(hf_model, PROMPT, RESPONSE)).abs().max() < 1e-4


@pytest.fixture(scope="module")
def tied_model_dir(tiny_model_factory):
    # Qwen2.5-Math-1.5B's setting (tie_word_embeddings) with a vocabulary Megatron pads.
    return tiny_model_factory(tie=True, vocab_size=300)


def test_tied_embeddings_sync_updates_the_output_layer(tied_model_dir, tmp_path):
    """Issue 13 item 1: vLLM loads a tied model's shared weight once, through embed_tokens;
    its LM head kept the prepacked CPU copy of the OLD weight, so the server sampled with
    the new input embedding and the old output layer (off by up to 2.6 in log-prob)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tied_model_dir, dtype=torch.float32).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    prompt, response = [p % 300 for p in PROMPT], [r % 300 for r in RESPONSE]
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(torch.randn(model.model.embed_tokens.weight.shape,
                                                         generator=torch.Generator().manual_seed(5)) * 0.5)
    ref = hf_logprobs(model, prompt, response)
    # What the trainer exports for a tied model: no lm_head.weight.
    state = [(k, v) for k, v in model.state_dict().items() if k != "lm_head.weight"]
    with vllm_server(tied_model_dir, tmp_path / "vllm", max_num_seqs=4) as srv:
        client = RolloutClient.for_server(srv, timeout=120, retries=1)
        before = torch.tensor(client.score_logprobs(prompt, response), dtype=torch.float64)
        stats = WeightSync(srv, transport="shm").push(state)
        assert stats["not_updated"] == []
        after = torch.tensor(client.score_logprobs(prompt, response), dtype=torch.float64)
        assert (before - ref).abs().max() > 0.1  # the perturbation is visible
        assert (after - ref).abs().max() < 1e-4, (after - ref).abs().max()
        # Sampled tokens' log-probs too (the trainer's logprob_gap), not only prompt scoring.
        for t in client.generate([prompt], n=2, max_tokens=10, seed=2, progress=False, extra={"ignore_eos": True}):
            ref_t = hf_logprobs(model, t.prompt_token_ids, t.response_token_ids)
            assert logprob_gap(torch.tensor([t.response_logprobs]), ref_t[None], torch.ones(1, len(ref_t))) < 1e-5


def test_gloo_broadcast_sync_matches_transformers_and_reconnects(server, client, hf_model):
    """The collective transport (issue 14 item 3) on CPU: a broadcast group with the server's
    workers over vLLM's stateless process group, backend gloo; the same code path as NCCL."""
    sync = WeightSync(server, transport="gloo", bucket_bytes=32 * 2**10)
    with pytest.raises(RuntimeError, match="call connect"):
        sync.push(hf_model.state_dict().items())
    sync.connect("127.0.0.1", free_port())  # a user-set port (rollout.weight_sync.master_port)
    for seed in (6, 7):  # a second connect replaces the group (what a server restart needs)
        perturb(hf_model, seed)
        ref = hf_logprobs(hf_model, PROMPT, RESPONSE)
        stats = sync.push(hf_model.state_dict().items())
        assert stats["not_updated"] == [] and stats["buckets"] > 10
        after = torch.tensor(client.score_logprobs(PROMPT, RESPONSE), dtype=torch.float64)
        assert (after - ref).abs().max() < 1e-4, (after - ref).abs().max()
        sync.connect("127.0.0.1", 0)  # port 0: the store's own free port
    sync.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="NCCL transport needs CUDA (GPU-only test)")
def test_nccl_sync_matches_transformers(server, client, hf_model):
    perturb(hf_model, 4)
    ref = hf_logprobs(hf_model, PROMPT, RESPONSE)
    sync = WeightSync(server, transport="nccl", bucket_bytes=32 * 2**10)
    sync.connect("127.0.0.1", 0)
    sync.push((k, v.cuda()) for k, v in hf_model.state_dict().items())
    after = torch.tensor(client.score_logprobs(PROMPT, RESPONSE), dtype=torch.float64)
    assert (after - ref).abs().max() < 1e-3  # GPU kernels (TF32) are looser than CPU fp32


def test_stop_leaves_no_process(server):
    pgid = os.getpgid(server.proc.pid)
    members = group_members(pgid)
    assert len(members) >= 2  # API server + engine core
    server.stop()
    server.stop()  # idempotent
    alive = [p for p in members if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert alive == [] and group_members(pgid) == []
