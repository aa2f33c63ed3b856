"""Decode-step timing feeds for decoders with a KV cache: the shape where weight-only int4 pays.

A decoder LLM spends its life generating one token at a time against a filled key/value cache: a
matrix-vector product per weight, bound by reading the weights. Timing it on the calibration prompts instead
(prefill: every prompt token at once, matrix-matrix products bound by compute) measures another workload.

A model is a KV-cache decoder when inputs and outputs pair up as exporters write them:

  optimum / transformers   past_key_values.N.key   -> present.N.key      (also .N.decoder.key in seq2seq)
  onnxruntime's GPT-2      past_N                  -> present_N          ([2, batch, heads, past, dim])
  others                   past.N.key, past_key_N  -> present.N.key, present_key_N

that is, an input named past_key_values / past_key_value / past + REST and an output named
present_key_values / present_key_value / present + the same REST. The decode-step feed is built the way a
generation loop builds it: run the model once on a prompt (one sample of the user's calibration data, or token
ids), take its present outputs as the cache, and feed one new token (batch 1): the prompt's last token again,
any valid id costs the same. The attention mask grows by one, the position ids step on by one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from compressq.data import model_inputs
from compressq.errors import DataError
from compressq.runtime import create_session

PAST_PREFIXES = ("past_key_values", "past_key_value", "past")
PRESENT_PREFIXES = ("present_key_values", "present_key_value", "present")
IDS_INPUT = "input_ids"
MASK_INPUT = "attention_mask"
POSITIONS_INPUT = "position_ids"
CACHE_POSITION_INPUT = "cache_position"    # newer transformers exports: the new tokens' places in the cache
USE_CACHE_INPUT = "use_cache_branch"        # optimum's merged decoder: True selects the with-cache branch

ModelOrPath = onnx.ModelProto | str | os.PathLike


@dataclass(frozen=True)
class KvCache:
    """Which inputs take the cache and which outputs hand it back, in input order."""

    pairs: tuple[tuple[str, str], ...]  # (past input, present output)

    @property
    def past_inputs(self) -> tuple[str, ...]:
        return tuple(past for past, _ in self.pairs)

    @property
    def present_outputs(self) -> tuple[str, ...]:
        return tuple(present for _, present in self.pairs)


def find_kv_cache(model: onnx.ModelProto) -> KvCache | None:
    """The cache pairs of a decoder, or None when the model has no past input that an output refills."""
    outputs = {_rest(o.name, PRESENT_PREFIXES): o.name for o in model.graph.output}
    outputs.pop(None, None)
    pairs = []
    for value in model.graph.input:
        rest = _rest(value.name, PAST_PREFIXES)
        if rest is None:
            continue
        if rest not in outputs:  # a past input nothing refills: not a cache this module can drive
            return None
        pairs.append((value.name, outputs[rest]))
    return KvCache(tuple(pairs)) if pairs else None


def _rest(name: str, prefixes: tuple[str, ...]) -> str | None:
    """What follows the first matching prefix (compared in lower case), or None. The rest must start with a
    separator or a digit, so that `pastry` is no cache; prefixes are tried longest first, so that
    `past_key_values.0.key` and `present.0.key` both leave `.0.key`."""
    lower = name.lower()
    for prefix in prefixes:
        if lower.startswith(prefix):
            rest = lower[len(prefix):]
            if rest and (rest[0] in "._/:-" or rest[0].isdigit()):
                return rest
    return None


def decode_step_feeds(model: ModelOrPath, prompt: Mapping[str, np.ndarray], provider: str = "cpu",
                      ) -> list[dict[str, np.ndarray]] | None:
    """One feed of one new token (batch 1) after the cache that `prompt` fills, or None for a non-decoder.

    `prompt`: a feed of the model (e.g. one batch of the calibration data; only its first sample is used).
    Cache inputs it lacks start empty. The model runs once on the prompt, at one thread.
    """
    proto = _graph_only(model)
    cache = find_kv_cache(proto)
    if cache is None:
        return None
    first = {name: _first_sample(values) for name, values in prompt.items()}
    filled = {**empty_cache_feed(proto, cache), **first}
    session = create_session(model, provider, threads=1)
    presents = dict(zip(cache.present_outputs, session.run(list(cache.present_outputs), filled)))
    return [next_token_feed(filled, cache, presents)]


def _first_sample(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values)
    return values[:1] if values.ndim >= 2 else values  # 1-D inputs (cache_position, flags) have no batch axis


def token_ids_prompt(model: ModelOrPath, ids: np.ndarray) -> dict[str, np.ndarray]:
    """A prompt feed for token ids [seq] or [1, seq]: mask of ones, positions 0.., empty cache.

    For models whose only sequence inputs are input_ids / attention_mask / position_ids; anything else
    (inputs_embeds, token_type_ids) must come from calibration data."""
    proto = _graph_only(model)
    cache = find_kv_cache(proto)
    ids = np.asarray(ids, np.int64).reshape(1, -1)
    feed: dict[str, np.ndarray] = {IDS_INPUT: ids}
    names = {spec.name for spec in model_inputs(proto)}
    if MASK_INPUT in names:
        feed[MASK_INPUT] = np.ones_like(ids)
    if POSITIONS_INPUT in names:
        feed[POSITIONS_INPUT] = np.arange(ids.shape[1], dtype=np.int64)[None]
    if CACHE_POSITION_INPUT in names:
        feed[CACHE_POSITION_INPUT] = np.arange(ids.shape[1], dtype=np.int64)
    if USE_CACHE_INPUT in names:
        feed[USE_CACHE_INPUT] = np.array([False])
    missing = sorted(names - set(feed) - set(cache.past_inputs if cache else ()))
    if IDS_INPUT not in names or missing:
        raise DataError(f"cannot build a prompt from token ids: the model's input{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(missing) or IDS_INPUT + ' (absent)'} need values",
                        hint="pass calibration data with one array per model input")
    return feed


def empty_cache_feed(model: onnx.ModelProto, cache: KvCache) -> dict[str, np.ndarray]:
    """Zero-length caches for batch 1: the batch axis (a symbolic dim named like batch, else axis 0 when not
    fixed) is 1, the other symbolic axis, the cache length, 0; fixed dims as declared."""
    specs = {spec.name: spec for spec in model_inputs(model)}
    feed = {}
    for name in cache.past_inputs:
        spec = specs[name]
        if spec.shape is None:
            raise DataError(f"the cache input '{name}' declares no shape",
                            hint="pass calibration data that includes the cache inputs (length 0 is fine)")
        feed[name] = np.zeros(_empty_shape(name, spec.shape), spec.dtype)
    return feed


def _empty_shape(name: str, shape: tuple[int | str | None, ...]) -> tuple[int, ...]:
    symbolic = [axis for axis, dim in enumerate(shape) if not (isinstance(dim, int) and dim > 0)]
    batch = next((axis for axis in symbolic if "batch" in str(shape[axis]).lower()), None)
    if batch is None and symbolic and symbolic[0] == 0:
        batch = 0
    lengths = [axis for axis in symbolic if axis != batch]
    if len(lengths) != 1:
        raise DataError(f"the cache input '{name}' has shape {list(shape)}: its length axis is not clear",
                        hint="pass calibration data that includes the cache inputs (length 0 is fine)")
    return tuple(1 if axis == batch else 0 if axis in lengths else dim if isinstance(dim, int) else 0
                 for axis, dim in enumerate(shape))


def next_token_feed(prompt: Mapping[str, np.ndarray], cache: KvCache,
                    presents: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The feed of one new token after `prompt`, whose run returned `presents` (pure: tests call it directly)."""
    past = dict(zip(cache.present_outputs, cache.past_inputs))
    feed = {past[name]: np.asarray(value) for name, value in presents.items()}
    length = _prompt_length(prompt)
    for name, values in prompt.items():
        if name in feed:
            continue
        values = np.asarray(values)
        if name == MASK_INPUT:
            feed[name] = np.concatenate([values, np.ones((*values.shape[:-1], 1), values.dtype)], axis=-1)
        elif name == POSITIONS_INPUT:
            feed[name] = values[..., -1:] + 1
        elif name == CACHE_POSITION_INPUT:
            feed[name] = values[-1:] + 1
        elif name == USE_CACHE_INPUT:
            feed[name] = np.ones_like(values, dtype=bool)
        elif values.ndim >= 2 and values.shape[1] == length:  # input_ids, inputs_embeds, token_type_ids
            feed[name] = np.ascontiguousarray(values[:, -1:])
        else:
            feed[name] = values
    return feed


def _prompt_length(prompt: Mapping[str, np.ndarray]) -> int | None:
    """Tokens in the prompt: input_ids' second axis, else position_ids'."""
    for name in (IDS_INPUT, POSITIONS_INPUT):
        if name in prompt and np.ndim(prompt[name]) >= 2:
            return int(np.shape(prompt[name])[1])
    return None


def _graph_only(model: ModelOrPath) -> onnx.ModelProto:
    """The graph's inputs and outputs are all we read: a path is loaded without its weights."""
    if isinstance(model, onnx.ModelProto):
        return model
    return onnx.load(os.fspath(model), load_external_data=False)
