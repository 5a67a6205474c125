"""Rollout client: prompts (token ids) -> trajectories from one or several vLLM engines.

Prompts go to /v1/completions as token ids and the response token ids come back from the
server (`return_token_ids`), so nothing is re-tokenised: the trainer scores exactly the
tokens the sampler produced. Each sampled token's log-prob comes with it (`logprobs: 0`):
these are vLLM's raw log-probs (temperature 1, before top-p), the quantity the trainer's
log pi is compared with (see logprob_gap in weight_sync.py).

With several engines (servers holding the same weights) each request goes to the engine with
the fewest requests in flight from this client (least outstanding requests): a slow or busy
engine keeps its requests longer and so gets fewer, where round-robin would queue as many on
it as on the others. Samples do not depend on the engine: a request's seed fixes them.

All requests of a call are sent from one thread (asyncio, httpx), not one thread per request:
on a busy CPU the threads' hand-offs delayed the last requests of a batch by seconds whenever
the engine was already generating for the first ones (docs/throughput.md, "The rollout time's
tail").
"""
from __future__ import annotations

import asyncio
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Sequence

import httpx
from tqdm.auto import tqdm

from megatron_tbrm.log import on_terminal

if TYPE_CHECKING:
    from megatron_tbrm.rollout.server import VLLMServer


@dataclass
class Trajectory:
    prompt_index: int  # position in the prompts passed to generate()
    sample_index: int  # 0..n-1 among the samples of that prompt
    prompt_token_ids: list[int]
    response_token_ids: list[int]
    response_logprobs: list[float]  # sampler's log-prob of each response token
    finish_reason: str  # "stop" (EOS / stop string) or "length"
    text: str  # the server's detokenisation, for logs and rewards; ids are the truth


class _Transient(Exception):
    """A failure worth retrying (connection reset, timeout, 5xx, 429)."""


@dataclass
class Endpoint:
    """One engine as the client sees it: its server, the requests in flight to it and the
    requests sent to it so far (both counted by this client)."""
    server: "VLLMServer"
    in_flight: int = 0
    requests: int = 0


class RolloutClient:
    """Bounded-concurrency client for one or several vLLM engines (`servers`, the same model
    and weights on each).

    At most `max_concurrency` x engines requests are in flight; each goes to the engine with the
    fewest in flight (ties: the one sent the fewest so far). `timeout` bounds every request (seconds to read the whole answer), so a
    hung server surfaces as an error. Transient failures are retried `retries` times with
    exponential backoff, each try routed anew; if the engine's process is dead, the request
    fails at once with that server's log tail (RolloutServerError.server names it).
    """

    def __init__(
        self,
        servers: Sequence["VLLMServer"],
        max_concurrency: int = 16,
        timeout: float = 600.0,
        retries: int = 3,
        backoff_s: float = 0.5,
    ):
        if not servers:
            raise ValueError("RolloutClient needs at least one server")
        self.engines = [Endpoint(s) for s in servers]
        self.max_concurrency = max_concurrency
        self.timeout = timeout
        self.retries = retries
        self.backoff_s = backoff_s
        self._lock = threading.Lock()  # in_flight is read from other threads (tests, logs)

    @classmethod
    def for_server(cls, server: "VLLMServer", **kwargs: Any) -> "RolloutClient":
        return cls([server], **kwargs)

    def requests_per_engine(self) -> list[int]:
        """Requests sent to each engine so far (retries included), in engine order."""
        return [e.requests for e in self.engines]

    # ------------------------------------------------------------------ public API
    def generate(
        self,
        prompts_token_ids: Sequence[Sequence[int]],
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_tokens: int = 256,
        stop: list[str] | None = None,
        seed: int | None = None,
        progress: bool = True,
        extra: dict[str, Any] | None = None,
        stop_token_ids: Sequence[int] | None = None,
    ) -> list[Trajectory]:
        """Sample `n` responses per prompt. Returns len(prompts) * n trajectories ordered
        by (prompt_index, sample_index). With `seed`, prompt i uses seed + i * n (vLLM
        seeds sample j of a request with seed + j), so results are reproducible and no two
        samples share a seed. `stop_token_ids` end a response besides the model's EOS (e.g.
        the chat template's end of turn, see `end_of_turn_token_ids`); the stop token is
        part of the response. Each request gets min(max_tokens, max_model_len - its own
        prompt length) tokens, max_model_len as the server reports it; a prompt with no room
        left raises ValueError naming it. `extra` is merged into each request body."""
        limit = self.max_model_len()
        if limit is not None:
            for i, ids in enumerate(prompts_token_ids):
                if len(ids) >= limit:
                    raise ValueError(f"prompt {i} has {len(ids)} tokens: no room for a response within "
                                     f"the server's max_model_len={limit}")

        def body(i: int, ids: Sequence[int]) -> dict[str, Any]:
            b = {
                "prompt": [int(t) for t in ids],
                "n": n,
                "temperature": temperature,
                "top_p": top_p,
                "max_tokens": max_tokens if limit is None else min(max_tokens, limit - len(ids)),
                "logprobs": 0,  # log-prob of the sampled token only
                "return_token_ids": True,
                "skip_special_tokens": False,
            }
            if stop:
                b["stop"] = stop
            if stop_token_ids:
                b["stop_token_ids"] = [int(t) for t in stop_token_ids]
            if seed is not None:
                b["seed"] = seed + i * n
            return b | (extra or {})

        async def one(http: httpx.AsyncClient, i: int) -> list[Trajectory]:
            out = await self._post(http, "/v1/completions", body(i, prompts_token_ids[i]))
            trajs = []
            for c in sorted(out["choices"], key=lambda c: c["index"]):
                logprobs = c["logprobs"]["token_logprobs"] if c.get("logprobs") else []
                trajs.append(Trajectory(
                    prompt_index=i,
                    sample_index=c["index"],
                    prompt_token_ids=list(c.get("prompt_token_ids") or prompts_token_ids[i]),
                    response_token_ids=list(c["token_ids"]),
                    response_logprobs=[float(x) for x in logprobs],
                    finish_reason=c["finish_reason"],
                    text=c["text"],
                ))
            return trajs

        results = self._map(one, len(prompts_token_ids), desc="rollout", progress=progress)
        return [t for trajs in results for t in trajs]

    def score_logprobs(self, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> list[float]:
        """The server's log-probs of a FIXED response after `prompt_ids` (one per response
        token), via prompt_logprobs over prompt+response; used to check that the server
        holds the trainer's weights."""
        return self.score_logprobs_batch([(prompt_ids, response_ids)], progress=False)[0]

    def score_logprobs_batch(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                             progress: bool = True) -> list[list[float]]:
        async def one(http: httpx.AsyncClient, i: int) -> list[float]:
            prompt, response = list(pairs[i][0]), list(pairs[i][1])
            ids = [int(t) for t in prompt + response]
            out = await self._post(http, "/v1/completions", {
                "prompt": ids, "max_tokens": 1,
                "prompt_logprobs": 0, "temperature": 1.0, "return_token_ids": True,
            })
            entries = out["choices"][0]["prompt_logprobs"]  # entry k: logprob of ids[k] | ids[:k]
            return [float(entries[k][str(ids[k])]["logprob"]) for k in range(len(prompt), len(ids))]

        return self._map(one, len(pairs), desc="score", progress=progress)

    def max_model_len(self) -> int | None:
        """The engines' context length (prompt + response), from the first engine's
        /v1/models; None if it does not say. Asked once per client."""
        if not hasattr(self, "_max_model_len"):
            try:
                r = httpx.get(f"{self.engines[0].server.url}/v1/models", timeout=10.0)
                self._max_model_len = int(r.json()["data"][0]["max_model_len"])
            except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
                return None  # not cached: a server still starting may answer next time
        return self._max_model_len

    # ------------------------------------------------------------------ plumbing
    def _map(self, fn: Callable[[httpx.AsyncClient, int], Awaitable[Any]], count: int, desc: str,
             progress: bool) -> list[Any]:
        """fn(http, i) for i in range(count), at most max_concurrency x engines at a time, all
        from one event loop; the first error cancels the rest (a hung server cannot hang us)."""
        limit = max(1, min(self.max_concurrency * len(self.engines), count))

        async def run() -> list[Any]:
            results: list[Any] = [None] * count
            gate = asyncio.Semaphore(limit)
            timeout = httpx.Timeout(self.timeout, connect=10.0)
            async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=limit)) as http:
                async def job(i: int) -> None:
                    async with gate:
                        results[i] = await fn(http, i)
                    bar.update(1)

                with tqdm(total=count, desc=desc, disable=not (progress and on_terminal()), leave=False) as bar:
                    tasks = [asyncio.ensure_future(job(i)) for i in range(count)]
                    try:
                        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                        for t in done:
                            if t.exception() is not None:
                                raise t.exception()
                    finally:
                        for t in tasks:
                            t.cancel()
                        await asyncio.gather(*tasks, return_exceptions=True)
            return results

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(run())
        with ThreadPoolExecutor(1) as pool:  # called from inside an event loop (e.g. a notebook)
            return pool.submit(asyncio.run, run()).result()

    def _acquire(self) -> Endpoint:
        """The engine with the fewest requests in flight (ties: fewest sent, then the first)."""
        with self._lock:
            engine = min(self.engines, key=lambda e: (e.in_flight, e.requests))
            engine.in_flight += 1
            engine.requests += 1
            return engine

    def _release(self, engine: Endpoint) -> None:
        with self._lock:
            engine.in_flight -= 1

    async def _post(self, http: httpx.AsyncClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
        last = ""
        for attempt in range(self.retries + 1):
            engine = self._acquire()
            server = engine.server
            try:
                try:
                    r = await http.post(f"{server.url}{path}", json={"model": server.model_name, **body})
                except httpx.TimeoutException as e:
                    raise _Transient(f"timed out after {self.timeout:.0f} s ({e.__class__.__name__})") from e
                except httpx.TransportError as e:
                    raise _Transient(f"connection failed: {e.__class__.__name__}: {e}") from e
                if r.status_code == 200:
                    return r.json()
                if r.status_code >= 500 or r.status_code == 429:
                    raise _Transient(f"HTTP {r.status_code}: {r.text[:500]}")
                raise server.error(f"rejected POST {path} with HTTP {r.status_code}: {r.text[:2000]}")
            except _Transient as e:
                last = str(e)
                if not server.alive():
                    raise server.error(f"died during POST {path} ({last})") from None
                if attempt < self.retries:
                    await asyncio.sleep(self.backoff_s * 2 ** attempt * (1 + random.random()))
            finally:
                self._release(engine)
        raise server.error(f"failed POST {path} after {self.retries + 1} attempts: {last}")


def end_of_turn_token_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an assistant turn in `tokenizer`'s chat template but that the
    model may not treat as EOS, e.g. `<|im_end|>` for Qwen2.5 base models, whose
    generation_config names only `<|endoftext|>`: without them as stop tokens every
    chat-templated response runs to max_tokens.

    Found by rendering a conversation whose assistant turn is a marker string and reading
    the special tokens right after the marker (up to the first non-special token). The EOS
    of the tokenizer is included when it is one of them (harmless: vLLM stops there too).
    Returns [] for a tokenizer without a chat template, or whose turn ends in plain text."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    marker = "ZQXJ"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False)
    tail = text[text.rindex(marker) + len(marker):]
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    ids = []
    for tid in tokenizer(tail, add_special_tokens=False)["input_ids"]:
        if tid not in special:
            if ids:
                break
            continue  # whitespace before the end-of-turn token
        ids.append(int(tid))
    return ids
