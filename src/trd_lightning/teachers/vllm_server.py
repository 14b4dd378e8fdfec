"""A teacher served by vLLM's OpenAI-compatible server (``vllm serve``) on other GPUs or machines.

Everything goes as token ids, never as text to tokenise again: the trainer's contexts and targets are its own
tokenizer's ids, and the server must read them the same way (checked at start-up).
- ``generate`` (TRD's rewrites, the teacher's solutions in evaluation): ``/v1/completions`` from the prompt's
  token ids, with the refiner's sampling and a seed drawn from torch's RNG (checkpointed, so a resumed run draws
  the same seeds); the completion's token ids come back (``return_token_ids``).
- ``score``: ``/v1/completions`` of context + target with ``prompt_logprobs: top_k``: at each target position the
  teacher's top-k tokens and their log-probabilities, and the target token's own (``SparseScores``).
- ``scores_from_decode``: a rewrite is scored in the very context it was written in (the refine prompt), so the
  decode that writes it can return the scores a scoring pass would (``logprobs: top_k``: at each generated token
  its log-probability and the top-k). vLLM (V1) computes these from the model's raw output, before temperature,
  top-k/top-p and penalties (``--logprobs-mode raw_logprobs``, its default); start-up checks that the server does.
  Rows trained on an unchanged rewrite then skip the scoring pass (``Targets.decoded_scores``).
Requests go one per sequence, concurrently, spread over the servers (replicas of one model); vLLM batches them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from trd_lightning.rollout.base import RolloutEngine, Rollouts, Sampling, split_completion
from trd_lightning.scores import DecodedScores, SparseScores
from trd_lightning.teachers.base import GENERATION_SEEDS, Teacher
from trd_lightning.teachers.client import ServerClient, ServerRequestError, ServerUnavailableError
from trd_lightning.views import ModelInputs

COMPLETIONS = "/v1/completions"
# Start-up probe: the student's tokenizer and the server's must give it the same ids (its EOS token is appended).
PROBE = "Probe: 0123456789 +-*/=()[]{}<>; Wait, Actually, However... \\boxed{42}\n\tdef f(x):\n    return x ** 2 # ünïcødé 中文"


class TeacherSetupError(ValueError):
    """The teacher server cannot serve this run (unreachable, another model, another tokenizer); found at start-up."""


class VLLMServerTeacher(Teacher):
    """The teacher at one or more running ``vllm serve`` endpoints.

    Args:
        urls: the servers' base URLs (``http://node3:8000``); several are replicas of the same model, and the requests
            are spread over them.
        model: the name the servers serve the model under (``vllm serve``'s ``--served-model-name``, else its model path).
        top_k: how many of the teacher's most likely tokens come back per scored position; at most the servers'
            ``--max-logprobs``, and at least the divergence's ``top_k`` for ``support: topk``.
        timeout: seconds to wait for a server's answer to one request (one whole rewrite, for generation).
        max_retries: retries of a request that failed (connection refused or reset, timeout, HTTP 429 or 5xx), each on
            the next server after ``retry_backoff * 2**attempt`` seconds. Then the run writes ``last.ckpt`` and stops.
        retry_backoff: seconds before the first retry.
        max_concurrent_requests: requests in flight at once (one per sequence; the servers batch them).
        scores_from_decode: have each generation return the teacher's scores of what it wrote (its top-k at every
            generated token), so that a rewrite trained on as written needs no scoring pass. Needs the servers'
            default ``--logprobs-mode raw_logprobs`` (checked at start-up).
    """

    scores = "sparse"
    concurrent = True

    def __init__(
        self,
        urls: list[str],
        model: str,
        top_k: int = 32,
        timeout: float = 600.0,
        max_retries: int = 3,
        retry_backoff: float = 2.0,
        max_concurrent_requests: int = 64,
        scores_from_decode: bool = True,
    ):
        if isinstance(urls, str):
            urls = [urls]
        if not urls:
            raise ValueError("VLLMServerTeacher needs at least one server URL in urls (e.g. http://127.0.0.1:8000)")
        if top_k < 0:
            raise ValueError(f"VLLMServerTeacher top_k must be >= 0 (got {top_k})")
        if not timeout > 0 or max_retries < 0 or retry_backoff < 0 or max_concurrent_requests <= 0:
            raise ValueError("VLLMServerTeacher needs timeout > 0, max_retries >= 0, retry_backoff >= 0 and max_concurrent_requests > 0")
        self.urls, self.model, self.top_k, self.scores_from_decode = list(urls), model, top_k, scores_from_decode
        self.client = ServerClient(self.urls, timeout, max_retries, retry_backoff, max_concurrent_requests, what=f"teacher server ({model})")
        self.tokenizer = None
        self.stop_ids: set[int] = set()

    def describe(self) -> str:
        return f"the teacher served at {', '.join(self.urls)} ({self.model})"

    # -- start-up ------------------------------------------------------------------------------------
    def setup(self, student: nn.Module, tokenizer, engine: RolloutEngine) -> None:
        """Every server: reachable, serving ``model``, tokenising the probe as the student does, and answering a
        scoring request at this ``top_k``. Before any compute; nothing of the teacher lives in this process."""
        self.tokenizer, self.stop_ids = tokenizer, set(engine.stop_ids)
        for url in self.urls:
            self.check_server(url)
        return None

    def check_server(self, url: str) -> None:
        try:
            served = [entry["id"] for entry in self.client.request("GET", "/v1/models", url=url)["data"]]
        except ServerUnavailableError as error:
            raise TeacherSetupError(
                f"the teacher server at {url} is not reachable: {error}. Start it first (`vllm serve MODEL --served-model-name "
                f"{self.model} --max-logprobs {max(self.top_k, 1)}`, see docs/served-teacher.md) or fix model.teacher.init_args.urls"
            ) from None
        if self.model not in served:
            raise TeacherSetupError(f"the teacher server at {url} serves {served}, not {self.model!r}; set model.teacher.init_args.model "
                                    "to the served name (vllm serve's --served-model-name, else the model path it was given)")
        probe = PROBE + (self.tokenizer.eos_token or "")
        theirs = self.client.request("POST", "/tokenize", {"model": self.model, "prompt": probe, "add_special_tokens": False}, url=url)["tokens"]
        ours = self.tokenizer(probe, add_special_tokens=False)["input_ids"]
        if theirs != ours:
            first = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
            raise TeacherSetupError(
                f"the teacher server at {url} ({self.model}) and the student's tokenizer ({self.tokenizer.name_or_path}) read a "
                f"probe text as different token ids (from token {first}: the server's {theirs[first:first + 5]}, the student's "
                f"{ours[first:first + 5]}); student and teacher must share one vocabulary, since token ids go between them"
            )
        try:
            self.client.request("POST", COMPLETIONS, self.score_payload(ours[:4]), url=url)
        except ServerRequestError as error:
            hint = f"; start it with --max-logprobs {self.top_k} or more, or lower top_k" if "logprobs" in str(error) else ""
            raise TeacherSetupError(f"the teacher server at {url} refused a scoring request for its top-{self.top_k}: {error}{hint}") from None
        if self.scores_from_decode:
            self.check_decode_scores(url, ours[:8])

    def check_decode_scores(self, url: str, prompt: list[int]) -> None:
        """A generation's scores must be a scoring pass's of what it wrote: sample at temperature 2 (processed
        log-probabilities would be flattened by half) and score the result."""
        probe = Sampling(temperature=2.0, top_p=1.0, top_k=0, max_new_tokens=8)
        answer = self.client.request("POST", COMPLETIONS, self.generate_payload(prompt, probe, 0), url=url)
        choice = answer["choices"][0]
        decoded = self.decoded(prompt, choice["token_ids"], choice)
        passed = self.score_sequences([(prompt, list(decoded.token_ids))], url=url)
        gaps = [(decoded.scores.target_logprob - passed.target_logprob).abs(), (decoded.scores.logprobs - passed.logprobs).abs().flatten()]
        gap = float(torch.cat(gaps).max()) if len(decoded.token_ids) else 0.0
        if not gap < 0.5:  # numerical noise between decode and prefill is far below; temperature 2 halves log-probabilities
            raise TeacherSetupError(
                f"the teacher server at {url} returns generation log-probabilities that are not the model's own (up to {gap:.2f} nats "
                "from a scoring pass of the same tokens): it was started with another --logprobs-mode. Restart it with "
                "--logprobs-mode raw_logprobs (vLLM's default), or set model.teacher.init_args.scores_from_decode=false")

    # -- the interface -------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sampling) -> Rollouts:
        seeds = GENERATION_SEEDS.get() or torch.randint(0, 2**31 - 1, (len(prompts),)).tolist()  # from the checkpointed torch RNG
        answers = self.client.map(COMPLETIONS, [self.generate_payload(prompt, sampling, seed) for prompt, seed in zip(prompts, seeds)])
        rollouts = Rollouts([], [], [], [], scores=[] if self.scores_from_decode else None)
        for index, answer in enumerate(answers):
            for choice in sorted(answer["choices"], key=lambda c: c["index"]):
                ids, truncated = split_completion(choice["token_ids"], self.stop_ids, sampling.max_new_tokens)
                rollouts.prompt_index.append(index)
                rollouts.token_ids.append(ids)
                rollouts.texts.append(self.tokenizer.decode(ids, skip_special_tokens=True))
                rollouts.truncated.append(truncated)
                if self.scores_from_decode:
                    rollouts.scores.append(self.decoded(prompts[index], ids, choice))
        return rollouts

    def decoded(self, prompt: Sequence[int], ids: list[int], choice: dict) -> DecodedScores:
        """The scores a generation returned for the first ``len(ids)`` tokens it wrote (``logprobs``, token ids as keys)."""
        logprobs = choice.get("logprobs")
        if not logprobs or len(logprobs["top_logprobs"]) < len(ids):
            raise ServerRequestError(f"{self.describe()} sent no log-probabilities with a generation (scores_from_decode needs them)")
        positions = [{int(k.removeprefix("token_id:")): v for k, v in entry.items()} for entry in logprobs["top_logprobs"][: len(ids)]]
        return DecodedScores(tuple(prompt), tuple(ids), self.sparse(ids, positions))

    def score(self, inputs: ModelInputs) -> SparseScores:
        return self.score_sequences(inputs.sequences())

    def score_sequences(self, sequences: Sequence[tuple[Sequence[int], Sequence[int]]], url: str | None = None) -> SparseScores:
        """Each target's scores after its context, one request per sequence (``url``: that server only)."""
        payloads = [self.score_payload([*context, *target]) for context, target in sequences]
        answers = [self.client.request("POST", COMPLETIONS, p, url=url) for p in payloads] if url else self.client.map(COMPLETIONS, payloads)
        parts = []
        for (context, target), answer in zip(sequences, answers):
            positions = answer["choices"][0]["prompt_logprobs"][len(context):]
            parts.append(self.sparse(target, [{int(k): v["logprob"] for k, v in entry.items()} for entry in positions]))
        return SparseScores.cat(parts) if parts else self.sparse([], [])

    def sparse(self, target: Sequence[int], positions: list[dict[int, float]]) -> SparseScores:
        """``SparseScores`` from each position's log-probabilities by token id (the top-k, and the target's own)."""
        ids, logprobs, target_logprobs = [], [], []
        for token, entry in zip(target, positions):
            top = sorted(((v, k) for k, v in entry.items()), reverse=True)[: self.top_k]
            if len(top) < self.top_k or token not in entry:
                raise ServerRequestError(f"{self.describe()} sent {len(top)} log-probabilities for a position, not top_k={self.top_k} "
                                         "and the target's")
            ids.append([k for _, k in top])
            logprobs.append([v for v, _ in top])
            target_logprobs.append(entry[token])
        shape = (len(target_logprobs), self.top_k)  # explicit: top_k may be 0 (the sampled-token estimators need none)
        return SparseScores(torch.tensor(ids, dtype=torch.long).reshape(shape), torch.tensor(logprobs, dtype=torch.float32).reshape(shape),
                            torch.tensor(target_logprobs, dtype=torch.float32))

    # -- requests ------------------------------------------------------------------------------------
    def score_payload(self, token_ids: list[int]) -> dict:
        """Log-probabilities of every token of the prompt, and the teacher's top-k at each position (one token is
        generated, and ignored: vLLM runs a request only to generate)."""
        return {"model": self.model, "prompt": list(token_ids), "max_tokens": 1, "prompt_logprobs": self.top_k, "temperature": 0.0}

    def generate_payload(self, prompt: Sequence[int], sampling: Sampling, seed: int) -> dict:
        return {
            "model": self.model, "prompt": list(prompt), "n": sampling.n, "max_tokens": sampling.max_new_tokens, "seed": seed,
            "temperature": 0.0 if sampling.greedy else sampling.temperature, "top_p": 1.0 if sampling.greedy else sampling.top_p,
            "top_k": 0 if sampling.greedy else sampling.top_k, "stop_token_ids": sorted(self.stop_ids),
            "return_token_ids": True, "skip_special_tokens": True,
            **({"logprobs": self.top_k, "return_tokens_as_token_ids": True} if self.scores_from_decode else {}),
        }
