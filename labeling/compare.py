"""Side-by-side evaluation: two model versions answer one prompt live, the annotator votes on the pair.

A `Responder` streams one model version's answer. `TransformersResponder` is the real one: a model loaded with
`align.models.load_model`, streamed through `transformers.TextIteratorStreamer`, then scored teacher-forced by
`align.generation.score_completions`, so the stored response carries the same provenance as `align generate`
output (token ids, decoding settings, finish reason, log-probs under the sampler and the raw model).
`compare_stream` runs two responders in turn-taking steps, stores both responses and a pair leased to the
annotator, and remembers which response was on the left so the vote is stored in response order.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from align.generation import SamplingSettings
from align.store import Pair, Store, add_prompts, add_responses, register_model_version
from align.store.clock import utcnow
from align.store.leases import lease_pair
from align.store.slots import add_slots
from labeling.handlers import ANNOTATE_ROLES, Labeling, Rejected

PAIR_RULE = "side_by_side"


@dataclass
class Completion:
    """A finished answer with its provenance, as `align.store.add_responses` takes it."""

    text: str
    completion_token_ids: list[int]
    finish_reason: str
    token_logps: list[float] | None = None
    sample_token_logps: list[float] | None = None


class Responder(Protocol):
    """One model version that answers prompts.

    `version` is the record `register_model_version` takes (at least "name" and "base_model");
    `stream(messages, settings)` yields text pieces as they come and finally one `Completion`.
    """

    version: dict[str, Any]

    def stream(self, messages: list[dict[str, str]], settings: SamplingSettings) -> Iterator[str | Completion]: ...


class TransformersResponder:
    """A local or hub causal LM, streamed token by token."""

    def __init__(self, spec: str, name: str | None = None, device: str | None = None, dtype: str = "auto"):
        from align.config import ModelArgs
        from align.models import base_revision, load_model, resolve_model, tokenizer_fingerprint

        self.model, self.tokenizer = load_model(ModelArgs(model=spec, dtype=dtype), device=device)
        self.model.eval()
        resolved = resolve_model(spec)
        self.version = {
            "name": name or spec, "base_model": spec, "base_revision": base_revision(resolved),
            "adapter_path": resolved.adapters[-1] if resolved.adapters else None,
            "method": "side_by_side", **tokenizer_fingerprint(self.tokenizer),
        }
        # A per-model lock: generate() seeds torch's global generator, so two streams of one model take turns.
        self.lock = threading.Lock()

    def stream(self, messages: list[dict[str, str]], settings: SamplingSettings) -> Iterator[str | Completion]:
        import torch
        from transformers import TextIteratorStreamer

        from align.data import prompt_ids
        from align.generation import score_completions

        ids = prompt_ids(self.tokenizer, messages)
        eos = self.eos_ids()
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=120)
        result: dict[str, Any] = {}
        greedy = settings.temperature == 0
        device = self.model.device
        kwargs = {
            "input_ids": torch.tensor([ids], device=device),
            "attention_mask": torch.ones(1, len(ids), dtype=torch.long, device=device),
            "streamer": streamer,
            "max_new_tokens": settings.max_new_tokens,
            "do_sample": not greedy,
            "temperature": None if greedy else settings.temperature,
            "top_p": None if greedy else settings.top_p,
            "top_k": None if greedy else settings.top_k,
            # Every warper explicit: library defaults (e.g. top_k=50) would silently change the distribution.
            "repetition_penalty": None, "min_p": None, "typical_p": None,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": sorted(eos),
        }

        def generate() -> None:
            try:
                with self.lock, torch.no_grad():
                    torch.manual_seed(settings.seed)
                    result["ids"] = self.model.generate(**kwargs)[0, len(ids):].tolist()
            except Exception as error:  # noqa: BLE001 - re-raised in the caller's thread after the stream ends
                result["error"] = error
                streamer.end()

        worker = threading.Thread(target=generate, daemon=True)
        worker.start()
        for piece in streamer:
            if piece:
                yield piece
        worker.join()
        if "error" in result:
            raise result["error"]
        tokens, finish = cut_at_eos(result["ids"], eos, self.tokenizer.pad_token_id)
        with self.lock:
            raw, sampled = score_completions(self.model, [ids], [tokens], settings, self.tokenizer.pad_token_id)
        yield Completion(
            text=self.tokenizer.decode(tokens, skip_special_tokens=True), completion_token_ids=tokens,
            finish_reason=finish, token_logps=raw[0], sample_token_logps=sampled[0],
        )

    def eos_ids(self) -> set[int]:
        configured = self.model.generation_config.eos_token_id
        found = set(configured if isinstance(configured, list) else [configured]) if configured is not None else set()
        found.add(self.tokenizer.eos_token_id)
        return {i for i in found if i is not None}


def cut_at_eos(tokens: list[int], eos_ids: set[int], pad_id: int | None) -> tuple[list[int], str]:
    """Keep tokens up to and including the first end-of-turn token ("stop"), else drop trailing pads ("length")."""
    for i, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[: i + 1], "stop"
    while tokens and tokens[-1] == pad_id:
        tokens = tokens[:-1]
    return tokens, "length"


@dataclass
class Frame:
    """What the side-by-side screen shows at one moment."""

    left: str
    right: str
    done: bool = False
    pair_id: int | None = None
    left_is: str | None = None
    response_ids: dict[str, int] = field(default_factory=dict)


def compare_stream(
    labeling: Labeling,
    user: str | None,
    prompt: str,
    responders: tuple[Responder, Responder],
    settings: SamplingSettings,
) -> Iterator[Frame]:
    """Stream both answers side by side (left/right decided before the first token), then store them.

    Response a is responders[0]'s answer, b is responders[1]'s; which one is on the left comes from a hash of
    (annotator, prompt, seed), is recorded on the pair, and is what the vote maps back through.
    """
    labeling.require(user, ANNOTATE_ROLES)
    prompt = (prompt or "").strip()
    if not prompt:
        raise Rejected("type a prompt first")
    messages = [{"role": "user", "content": prompt}]
    digest = hashlib.blake2b(f"{user}\0{prompt}\0{settings.seed}".encode(), digest_size=8).digest()
    left_is = "a" if digest[0] & 1 == 0 else "b"
    order = (0, 1) if left_is == "a" else (1, 0)
    streams = [responders[0].stream(messages, settings), responders[1].stream(messages, settings)]
    texts, finished = ["", ""], [None, None]
    while not all(finished):
        for side in (0, 1):  # one step of each in turn, so both sides grow together on screen
            if finished[side] is not None:
                continue
            piece = next(streams[side], None)
            if isinstance(piece, Completion):
                finished[side] = piece
            elif piece is None:
                raise RuntimeError(f"responder {side} ended without a completion")
            else:
                texts[side] += piece
        yield Frame(left=texts[order[0]], right=texts[order[1]], left_is=left_is)
    pair_id, response_ids = store_comparison(labeling, user, prompt, responders, finished, settings, left_is)
    yield Frame(
        left=finished[order[0]].text, right=finished[order[1]].text, done=True, pair_id=pair_id, left_is=left_is,
        response_ids=response_ids,
    )


def store_comparison(
    labeling: Labeling, user: str, prompt: str, responders, completions: list[Completion],
    settings: SamplingSettings, left_is: str,
) -> tuple[int, dict[str, int]]:
    store: Store = labeling.store
    [prompt_id] = add_prompts(store, [{"prompt": prompt, "source": "side_by_side"}])
    rows = []
    for responder, completion in zip(responders, completions):
        version_id = register_model_version(store, responder.version)
        rows.append({
            "prompt_id": prompt_id, "model_version_id": version_id, "seed": settings.seed, "sample_index": 0,
            "temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k,
            "max_new_tokens": settings.max_new_tokens, "text": completion.text,
            "completion_token_ids": completion.completion_token_ids, "finish_reason": completion.finish_reason,
            "token_logps": completion.token_logps, "sample_token_logps": completion.sample_token_logps,
        })
    response_a, response_b = add_responses(store, rows)
    pair_id = add_comparison_pair(store, prompt_id, response_a, response_b, user, left_is,
                                  [r.version["name"] for r in responders])
    lease_pair(store, pair_id, user, labeling.config.lease_seconds, left=left_is)
    return pair_id, {"a": response_a, "b": response_b}


def add_comparison_pair(
    store: Store, prompt_id: int, response_a: int, response_b: int, user: str, left_is: str, models: list[str]
) -> int:
    """The pair of the two answers (an existing one if the same two responses were paired before), one vote
    required, with the left side recorded per annotator under rule_params["shown_left"]."""
    from sqlalchemy import select

    with store.write() as session:
        pair = session.scalars(
            select(Pair).where(Pair.response_a_id == response_a, Pair.response_b_id == response_b)
        ).one_or_none()
        if pair is None:
            pair = Pair(prompt_id=prompt_id, response_a_id=response_a, response_b_id=response_b, rule=PAIR_RULE,
                        rule_params={"models": models, "shown_left": {}}, votes_required=1, created_at=utcnow())
            session.add(pair)
        params = dict(pair.rule_params or {})
        params["shown_left"] = {**(params.get("shown_left") or {}), user: left_is}
        pair.rule_params = params  # a new dict, so the JSON column is marked changed
        session.flush()
        add_slots(session, [(pair.id, pair.votes_required)])
        return pair.id
