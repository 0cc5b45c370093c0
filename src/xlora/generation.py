"""Exact incremental decoding for X-LoRA: two KV caches through Hugging Face's own ``generate()``.

Attention is causal, so the scalings of token ``t`` depend only on tokens ``<= t``. Decoding is
therefore exact with one cache per pass: :class:`XLoraCache` *is* the main pass's
``DynamicCache`` and owns the scaling pass's cache, and every cache operation transformers calls
(``reorder_cache`` for beams, ``crop``, ``batch_repeat_interleave``, ``batch_select_indices``,
``reset``) is applied to both. Each new token costs one incremental step of each pass.

With ``granularity="prompt"`` the scalings are computed over the prompt once (the last prompt
token's, or the mean over the prompt's real tokens) and held fixed: decoding runs the main pass only. With a
top-k head the fixed coefficients are folded into each module's ``A`` once (``A' = diag(c)·A`` per sequence,
only the columns with ``c ≠ 0``), so a step computes only the chosen experts, in two plain matmuls per module.
A dense head's steps scale the shared ``A``'s output instead: folding all ``E`` experts per sequence
measured no faster at batch 1 and 6 % slower at batch 8 (``benchmarks/fold.py``, BENCHMARKS.md).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from transformers import GenerationMixin
from transformers.cache_utils import Cache

from xlora.cache import Granularity, PromptReduce, XLoraCache
from xlora.sparse import FoldedExperts


class ScalingsObserver(Protocol):
    """The one way to observe scalings: passed explicitly as ``observer=`` to ``forward`` or ``generate``.

    ``record`` is called once per forward with the scalings it applied, ``[b, t, L, E]``, and that
    forward's ``input_ids`` ``[b, t]`` and ``attention_mask`` (``[b, past + t]`` while decoding).
    :class:`~xlora.analysis.ScalingsLog` and :class:`StepRecorder` are observers.
    """

    def record(self, scalings: torch.Tensor, input_ids: torch.Tensor | None,
               attention_mask: torch.Tensor | None) -> None: ...


class StepRecorder:
    """An observer that keeps each forward's scalings; :meth:`per_token` lines them up with new tokens."""

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []  # one [b, t_step, L, E] per forward

    def record(self, scalings: torch.Tensor, input_ids: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None) -> None:
        self.steps.append(scalings.detach())

    def per_token(self, n_new: int, row: int = 0) -> torch.Tensor:
        """``[n_new, L, E]``: for generated token ``k``, the scalings of the last position of the step
        that predicted it (step ``k``: the prompt for ``k = 0``, then the token before)."""
        if n_new > len(self.steps):
            raise ValueError(f"{n_new} new tokens but only {len(self.steps)} forward steps were recorded")
        if n_new == 0:
            shape = self.steps[0].shape[2:] if self.steps else (0, 0)
            return torch.empty(0, *shape)
        return torch.stack([s[row, -1] for s in self.steps[:n_new]])


def reduce_prompt_scalings(s: torch.Tensor, attention_mask: torch.Tensor | None, how: PromptReduce) -> torch.Tensor:
    """Prompt scalings ``[b, t, L, E]`` -> ``[b, 1, L, E]``: the last real token's, or the mean over real tokens."""
    b, t = s.shape[:2]
    mask = torch.ones(b, t, device=s.device) if attention_mask is None else attention_mask[:, -t:].to(s.device)
    mask = mask.to(s.dtype)
    if how == "mean":
        w = mask / mask.sum(1, keepdim=True).clamp_min(1)
        return (s * w[:, :, None, None]).sum(1, keepdim=True)
    last = t - 1 - mask.flip(1).argmax(1)  # index of the last real token (works for left and right padding)
    return s[torch.arange(b, device=s.device), last].unsqueeze(1)


class XLoraGenerationMixin(GenerationMixin):
    """Hugging Face ``generate()`` for :class:`~xlora.model.XLoraModel`, with the dual cache.

    The model supplies ``base_model``, ``compute_scalings(**inputs)`` and a ``forward`` that calls
    :meth:`step_scalings`.
    """

    main_input_name = "input_ids"
    _is_stateful = False

    @classmethod
    def is_remote_code(cls) -> bool:
        return False

    @classmethod
    def can_generate(cls) -> bool:
        return True

    # PreTrainedModel methods that generate() calls, answered by the base model explicitly.
    def get_experts_implementation(self):  # noqa: ANN201
        return self.base_model.get_experts_implementation()

    def set_experts_implementation(self, implementation):  # noqa: ANN001, ANN201
        return self.base_model.set_experts_implementation(implementation)

    def new_cache(self, granularity: Granularity = "token", prompt_scalings: PromptReduce = "last") -> XLoraCache:
        """An empty :class:`XLoraCache` for this model (pass it as ``cache=`` to ``forward``/``generate``)."""
        return XLoraCache(self.base_model.config, granularity, prompt_scalings)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):  # noqa: ANN001
        cache = model_kwargs.get("cache")
        if cache is not None and not isinstance(cache, XLoraCache):
            raise ValueError(
                f"cache={type(cache).__name__}: X-LoRA decodes with two caches; pass model.new_cache() or no cache"
            )
        if generation_config.cache_implementation not in (None, "dynamic"):
            raise ValueError(
                f"cache_implementation={generation_config.cache_implementation!r} is not supported by X-LoRA; "
                "leave it unset (X-LoRA uses its own dynamic dual cache)"
            )
        if cache is None and generation_config.use_cache is not False:
            model_kwargs["cache"] = self.new_cache()
        elif cache is not None:
            cache._is_user_defined = True

    def generate(self, *args: Any, granularity: Granularity = "token", prompt_scalings: PromptReduce = "last",
                 observer: ScalingsObserver | None = None, **kwargs: Any):
        """``transformers`` ``generate()`` with exact dual-cache X-LoRA decoding.

        X-LoRA always decodes with its dual cache, whatever the base's config or generation config
        say about ``use_cache``; ``use_cache=False`` here recomputes every step without a cache.

        Args:
            granularity: ``"token"`` (default): scalings for every generated token (two incremental
                passes per token); ``"prompt"``: scalings fixed after the prompt (one pass per token).
            prompt_scalings: with ``"prompt"``: ``"last"`` prompt token's scalings or the ``"mean"``.
            observer: receives every step's scalings (see :class:`ScalingsObserver`), e.g. a
                :class:`StepRecorder` or :class:`~xlora.analysis.ScalingsLog`; not with beams.
            *args, **kwargs: as for ``transformers.GenerationMixin.generate`` (``max_new_tokens``,
                ``do_sample``, ``num_beams``, ``streamer``, ``stop_strings`` with ``tokenizer``, ...).
        """
        use_cache = kwargs.pop("use_cache", None) is not False
        if observer is not None:
            beams = kwargs.get("num_beams") or getattr(kwargs.get("generation_config"), "num_beams", 1) or 1
            if beams > 1:
                raise ValueError("observer= is not supported with num_beams > 1 (beams reorder the history); "
                                 "observe greedy or sampled decoding")
            kwargs["observer"] = observer
        if not use_cache:
            if granularity != "token" or kwargs.get("cache") is not None:
                raise ValueError("use_cache=False recomputes every step without a cache: granularity='prompt' "
                                 "and cache= need the cache")
        elif kwargs.get("cache") is None:
            kwargs["cache"] = self.new_cache(granularity, prompt_scalings)
        return super().generate(*args, use_cache=use_cache, **kwargs)

    def step_experts(self, inputs: dict[str, Any], cache: Cache | None,
                     ) -> tuple[torch.Tensor, tuple[FoldedExperts | None, ...] | None]:
        """:meth:`step_scalings` and, on prompt granularity's decoding steps with a top-k head, every adapted
        module's chosen experts with the fixed scalings folded in (``None`` otherwise); folded once per cache."""
        decoding = isinstance(cache, XLoraCache) and cache.granularity == "prompt" and cache.fixed_scalings is not None
        s = self.step_scalings(inputs, cache)
        if not decoding or self.xlora_config.top_k is None:
            return s, None
        if cache.folded is None:
            fixed, g = cache.fixed_scalings[:, 0], self.xlora_config.global_scaling_weight  # [b, L, E]
            cache.folded = tuple(layer.fold(fixed, g) for layer in self.mixture_layers())
        return s, cache.folded

    def step_scalings(self, inputs: dict[str, Any], cache: Cache | None) -> torch.Tensor:
        """Scalings ``[b, t, L, E]`` for this forward's new tokens, using the scaling cache if any."""
        if cache is None:
            return self.compute_scalings(**inputs)
        if not isinstance(cache, XLoraCache):
            raise ValueError(
                f"cache={type(cache).__name__}: X-LoRA needs an XLoraCache (model.new_cache()) holding both passes' caches"
            )
        if cache.granularity == "token" and cache.scaling_cache.get_seq_length() != cache.get_seq_length():
            raise ValueError(
                f"this XLoraCache's scaling cache holds {cache.scaling_cache.get_seq_length()} tokens but its main "
                f"cache {cache.get_seq_length()}: scalings were fixed by hand for part of it; start a new cache"
            )
        if cache.granularity == "prompt":
            if cache.fixed_scalings is None:
                # The prompt itself is processed with its own per-token scalings (so the first new
                # token equals token granularity's); the reduced scalings then hold for decoding.
                s = self.compute_scalings(**inputs)
                cache.fixed_scalings = reduce_prompt_scalings(s, inputs.get("attention_mask"), cache.prompt_scalings)
            else:
                ref = inputs["input_ids"] if inputs.get("input_ids") is not None else inputs["inputs_embeds"]
                s = cache.fixed_scalings.expand(-1, ref.shape[1], -1, -1)
        else:
            s = self.compute_scalings(cache.prefix, **inputs, cache=cache.scaling_cache, use_cache=True)
        return s


def pad_token_id(tokenizer: Any) -> int:
    """The id to pad batches with: the tokenizer's pad token, else its EOS token, else 0.

    Padded positions are masked (attention mask 0, label ``-100``), so any id works; this one choice
    is used by every caller (CLI, inspect, trainer, demo, server).
    """
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(tid, int):
            return tid
    return 0


def encode_prompt(tokenizer: Any, prompt: str | list[dict[str, Any]], *, chat: bool = False,
                  device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """``{"input_ids", "attention_mask"}`` of shape ``[1, t]`` for one prompt.

    ``chat=True`` (or a list of ``{"role", "content"}`` messages) applies the tokenizer's chat
    template with a generation prompt; otherwise the text is tokenised as it is.
    """
    if isinstance(prompt, list) or chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat=True but the tokenizer has no chat_template; drop --chat or use a chat model")
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
    else:
        enc = tokenizer(prompt, return_tensors="pt")
    return {k: v.to(device) if device is not None else v for k, v in enc.items()
            if k in ("input_ids", "attention_mask")}


class _CallbackStreamer:
    """Streams decoded text pieces to ``write`` as tokens arrive (skipping the prompt)."""

    def __init__(self, tokenizer: Any, write: Any) -> None:
        self.tokenizer, self.write = tokenizer, write
        self.ids: list[int] = []
        self.printed = 0
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return
        self.write(text[self.printed:])
        self.printed = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if len(text) > self.printed:
            self.write(text[self.printed:])
        self.printed = len(text)


def generate_text(model: Any, tokenizer: Any, prompt: str, *, chat: bool = False, stream: Any = None,
                  max_new_tokens: int = 64, **generate_kwargs: Any) -> tuple[str, list[int], torch.Tensor]:
    """Generate from one text prompt; returns ``(text, new_token_ids, scalings)``.

    ``scalings`` has shape ``[n_new, L, E]``: for each generated token, the scalings of the forward
    step that predicted it. ``stream`` (a callable taking ``str``) receives the text as it is produced;
    ``chat=True`` applies the tokenizer's chat template with a generation prompt.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    enc = encode_prompt(tokenizer, prompt, chat=chat, device=model.device)
    if enc["input_ids"].shape[1] == 0:
        raise ValueError(f"prompt {prompt!r} gives no tokens; give some text (or chat=True: the template adds tokens)")
    pad = pad_token_id(tokenizer)
    streamer = _CallbackStreamer(tokenizer, stream) if stream is not None else None
    recorder = StepRecorder()
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, observer=recorder, streamer=streamer,
                             pad_token_id=pad, **generate_kwargs)
    new_ids = out[0, enc["input_ids"].shape[1]:].tolist()
    scalings = recorder.per_token(len(new_ids))
    return tokenizer.decode(new_ids, skip_special_tokens=True), new_ids, scalings
