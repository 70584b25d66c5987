"""The local decoding engine: continuous-batching greedy decoding with a transformers model.

Imported only when an answer must be generated in-process (`generation.local_generator`), so
importing qa-lab, `--help` and warm reruns never import torch or transformers.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from qa_lab.generation import Generator, GenParams, cut_at_stop

# Prefill padding (tokens) a chunk of prompt rests may add before a new chunk is started: about
# what one more forward pass costs in prefill tokens. Measured on 2 CPU cores (each pass streams
# all the weights once). On CUDA a pass over a few hundred more tokens costs about the same as
# one (the weights dominate), so padding is cheaper than another pass; 256 is an estimate, not
# yet measured on a GPU (no device lent).
PREFILL_SLACK = {"cpu": 32, "cuda": 256}


class LocalGenerator(Generator):
    """Batched generation with a transformers model (left padding, length-sorted batches).

    A batch holds at most `batch_size` rows and at most `batch_tokens` cached positions
    (prompt + `max_new_tokens` per row): short closed-book prompts decode many rows at once,
    where each step's weight reads are shared; long RAG prompts fewer, since their KV cache
    (memory, and attention reads every step) grows with the prompt. Greedy decoding keeps the
    batch full by admitting waiting prompts as others finish (see `_greedy`).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        params: GenParams,
        batch_size: int,
        batch_tokens: int | None = None,
    ) -> None:
        self.model, self.tokenizer, self.params = model, tokenizer, params
        self.batch_size = max(1, int(batch_size))
        self.batch_tokens = int(batch_tokens) if batch_tokens else None
        # The end-of-turn token ends an answer; the tokenizer's EOS may be another token.
        eos = {tokenizer.eos_token_id}
        end_turn = (
            tokenizer.convert_tokens_to_ids("<|im_end|>")
            if "<|im_end|>" in (tokenizer.get_vocab())
            else None
        )
        if end_turn is not None:
            eos.add(end_turn)
        self.eos_ids = sorted(i for i in eos if i is not None)
        # Tokens decoded to look for a stop string: every token is at least one character.
        self._stop_window = max((len(s) for s in params.stop_strings), default=0) + 1

    def rows_for(self, prompt_tokens: int) -> int:
        """Rows a batch may hold when its longest prompt has this many tokens."""
        if self.batch_tokens is None:
            return self.batch_size
        fits = self.batch_tokens // (prompt_tokens + self.params.max_new_tokens)
        return max(1, min(self.batch_size, fits))

    def batches(self, prompts: Sequence[str]) -> list[list[int]]:
        """Index batches of prompts sorted by token length, so padding stays small."""
        lengths = [len(ids) for ids in self.tokenizer(list(prompts))["input_ids"]]
        batches: list[list[int]] = []
        for i in sorted(range(len(prompts)), key=lambda i: (lengths[i], i)):
            if not batches or len(batches[-1]) >= self.rows_for(lengths[i]):
                batches.append([])
            batches[-1].append(i)
        return batches

    def stream(self, prompts: Sequence[str]) -> Iterator[list[tuple[int, dict[str, Any]]]]:
        """Answer the prompts, yielding (prompt position, answer) groups as they finish.

        An answer is exactly the newly generated tokens; its `seconds` is its share of the
        wall time of the forward passes it took part in (so they sum to the wall time).
        """
        rows = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            if not self.params.do_sample:
                for group in self._greedy(rows):
                    yield [(i, self._finish(tokens, len(rows[i]), s)) for i, tokens, s in group]
                return
            for batch in self.batches(prompts):
                started = time.perf_counter()
                new_tokens = self._sample([rows[i] for i in batch])
                seconds = (time.perf_counter() - started) / len(batch)
                yield [
                    (i, self._finish(tokens, len(rows[i]), seconds))
                    for i, tokens in zip(batch, new_tokens)
                ]

    def _sample(self, rows: list[list[int]]) -> list[list[int]]:
        """Sampled answers through `generate` (its samplers honour the model's top-k/top-p)."""
        enc = self.tokenizer.pad({"input_ids": rows}, return_tensors="pt").to(self.model.device)
        torch.manual_seed(self.params.seed)
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.params.max_new_tokens,
            "do_sample": True,
            "temperature": self.params.temperature,
            "eos_token_id": self.eos_ids,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if self.params.stop_strings:
            kwargs.update(stop_strings=list(self.params.stop_strings), tokenizer=self.tokenizer)
        out = self.model.generate(**enc, **kwargs)
        return out[:, enc["input_ids"].shape[1] :].tolist()

    def _greedy(self, rows: list[list[int]]) -> Iterator[list[tuple[int, list[int], float]]]:
        """Greedy decoding that keeps the batch full; yields (prompt, tokens, seconds) groups.

        `generate` decodes a batch until its longest answer ends, decoding padding for the rows
        that finished; with answers of 10 to 100 tokens that is most of the work, and a decode
        step costs almost as much at 16 rows as at 64 (each step streams all the weights).
        Here a row that emits an end-of-turn token or completes a stop string leaves the batch
        and the KV cache at once, and whenever a quarter of the batch is free the next waiting
        prompts (shortest first) are prefilled and join the running rows, left-padded to the
        same cache length (refilling each time one row ends would pay a prefill call per row).
        Argmax over the same logits: the same answers as `generate(do_sample=False)` (tested),
        up to float noise of the batch shape.
        """
        eos = torch.tensor(self.eos_ids, device=self.model.device)
        waiting = sorted(range(len(rows)), key=lambda i: (len(rows[i]), i))
        waiting.reverse()  # popped from the end: shortest first
        out: dict[int, list[int]] = {}
        spent: dict[int, float] = {}
        running: _Running | None = None
        clock = time.perf_counter()

        def charge(ids: list[int]) -> None:
            """Split the wall time since the last charge among the rows that used it."""
            nonlocal clock
            now = time.perf_counter()
            for i in ids:
                spent[i] = spent.get(i, 0.0) + (now - clock) / len(ids)
            clock = now

        while waiting or (running is not None and running.ids):
            busy = len(running.ids) if running is not None else 0
            room = self.rows_for(len(rows[waiting[-1]])) if waiting else 0
            if waiting and (not busy or (room - busy >= max(1, room // 4) and self._joinable)):
                take: list[int] = []
                while waiting and busy + len(take) < self.rows_for(len(rows[waiting[-1]])):
                    take.append(waiting.pop())
                fresh = self._prefill([rows[i] for i in take], take)
                charge(take)
                parts = [running, fresh] if busy else [fresh]
                running = _Running.stack(parts, self.params.max_new_tokens)
            tokens = running.logits.argmax(dim=-1)
            at_eos = torch.isin(tokens, eos).tolist()
            finished, keep = [], []
            for row, (i, token) in enumerate(zip(running.ids, tokens.tolist())):
                out.setdefault(i, []).append(token)
                if (
                    at_eos[row]
                    or len(out[i]) == self.params.max_new_tokens
                    or self._hit_stop_string(out[i])
                ):
                    finished.append(i)
                else:
                    keep.append(row)
            if finished:
                yield [(i, out.pop(i), spent.pop(i)) for i in finished]
                tokens = tokens[running.keep(keep)]
            if running.ids:
                running.step(self.model, tokens)
                charge(running.ids)

    def _prefill(self, rows: list[list[int]], ids: list[int]) -> _Running:
        """Run the prompts: their shared token prefix once, the rests in chunks of similar length.

        Every prompt of a study starts with the same chat header and system prompt (24 of ~40
        tokens on the embedded model), so the prefill spends most of its time on identical
        tokens. The shared prefix runs once and its KV cache is copied into every row; only the
        rest of each prompt runs, left-padded after the prefix (`[prefix | pad | rest]`, padding
        masked out, positions counted over real tokens, so each row sees the same tokens at the
        same positions as on its own). The rests run in chunks of similar length
        (`length_chunks`): one padded batch of 192 closed-book prompts was 58% padding.
        """
        model, device = self.model, self.model.device
        shared = shared_prefix(rows) if len(rows) > 1 else 0
        prefix = DynamicCache(config=model.config)
        if shared:
            model(
                input_ids=torch.tensor([rows[0][:shared]], device=device),
                cache=prefix,
                use_cache=True,
                logits_to_keep=1,
            )
        chunks = (
            length_chunks([len(row) for row in rows], PREFILL_SLACK.get(device.type, 32))
            if self._joinable
            else [list(range(len(rows)))]
        )
        parts = [
            self._prefill_rests([rows[j] for j in chunk], [ids[j] for j in chunk], shared, prefix)
            for chunk in chunks
        ]
        return _Running.stack(parts, self.params.max_new_tokens)

    def _prefill_rests(
        self, rows: list[list[int]], ids: list[int], shared: int, prefix: Any
    ) -> _Running:
        """Prefill rows whose first `shared` tokens are already in `prefix` (one row's cache)."""
        model, device = self.model, self.model.device
        cache = DynamicCache(config=model.config)
        room = max(len(row) for row in rows) + self.params.max_new_tokens
        cache.layers = [
            PreallocatedLayer(room) if type(layer) is DynamicLayer else layer
            for layer in cache.layers
        ]
        if shared:
            for layer, done in zip(cache.layers, prefix.layers):
                layer.update(
                    done.keys.expand(len(rows), -1, -1, -1),
                    done.values.expand(len(rows), -1, -1, -1),
                )
        rests = self.tokenizer.pad(  # left-padded: the tokenizer's padding side (models.py)
            {"input_ids": [row[shared:] for row in rows]}, return_tensors="pt"
        ).to(device)
        mask = rests["attention_mask"]
        mask = torch.cat([mask.new_ones(len(rows), shared), mask], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
        logits = model(
            input_ids=rests["input_ids"],
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        return _Running(list(ids), cache, logits, mask, positions[:, -1:], self._joinable)

    @functools.cached_property
    def _joinable(self) -> bool:
        """Whether rows can join a running batch.

        True when every cache layer of this model is a plain `DynamicLayer` (sliding-window
        layers drop old positions, which joining does not handle).
        """
        layers = DynamicCache(config=self.model.config).layers
        return all(type(layer) is DynamicLayer for layer in layers)

    def _hit_stop_string(self, tokens: list[int]) -> bool:
        """Whether the answer so far ends in a stop string (only its tail is decoded)."""
        if not self.params.stop_strings:
            return False
        tail = self.tokenizer.decode(tokens[-self._stop_window :], skip_special_tokens=False)
        return any(s in tail for s in self.params.stop_strings)

    def _finish(self, tokens: list[int], prompt_len: int, seconds: float) -> dict[str, Any]:
        pad = self.tokenizer.pad_token_id
        generated: list[int] = []
        reason = "length"
        for tok in tokens:
            if tok in self.eos_ids:
                reason = "eos"
                break
            generated.append(tok)
        if reason == "length" and pad not in self.eos_ids:
            while generated and generated[-1] == pad and len(generated) < len(tokens):
                generated.pop()
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        text, stopped = cut_at_stop(text, self.params.stop_strings)
        if stopped:
            reason = "stop_string"
        gen_count = len(generated) + (1 if reason == "eos" else 0)
        return {
            "prediction": text.strip(),
            "prompt_tokens": prompt_len,
            "generated_tokens": gen_count,
            "stop_reason": reason,
            "seconds": seconds,
        }


class PreallocatedLayer(DynamicLayer):
    """A `DynamicLayer` that writes into a buffer sized for the whole answer up front.

    `DynamicLayer.update` concatenates the new key/value onto the whole cache every step:
    a copy of the KV cache per layer per token, ~10% of a CPU decode step at batch 64. Here
    each step writes one slot of a buffer allocated once for prompt + `max_new_tokens` and
    hands attention a view of the filled part; dropping finished rows copies only when rows
    leave.
    """

    def __init__(self, room: int) -> None:
        super().__init__()
        self.room, self.filled = room, 0

    def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> Any:
        """Write the new positions into the buffer; attention gets a view of the filled part."""
        if not self.is_initialized:
            self.device, self.is_initialized = key_states.device, True
            shape = (*key_states.shape[:2], self.room, key_states.shape[-1])
            self.key_buf = key_states.new_empty(shape)
            self.value_buf = value_states.new_empty(shape)
        end = self.filled + key_states.shape[-2]  # room: the longest prompt + max new
        self.key_buf[:, :, self.filled : end] = key_states
        self.value_buf[:, :, self.filled : end] = value_states
        self.filled = end
        self.keys, self.values = self.key_buf[:, :, :end], self.value_buf[:, :, :end]
        return self.keys, self.values

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat each row (`generate`'s beam/sample expansion), buffer and all."""
        self._rebatch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Any) -> None:
        """Keep these rows (a copy of the buffer)."""
        self._rebatch(lambda t: t[indices])

    def _rebatch(self, pick: Any) -> None:
        if self.is_initialized:
            self._set(pick(self.key_buf), pick(self.value_buf), self.filled)

    def move_rows(self, dst: list[int], src: list[int], rows: int) -> None:
        """Copy rows `src` onto rows `dst`, then keep the first `rows` rows (a view)."""
        if dst:
            for buf in (self.key_buf, self.value_buf):
                buf[dst, :, : self.filled] = buf[src, :, : self.filled]
        self._set(self.key_buf[:rows], self.value_buf[:rows], self.filled)

    def drop_front(self, n: int) -> None:
        """Forget the first `n` positions (padding for every row); no copy."""
        self._set(self.key_buf[:, :, n:], self.value_buf[:, :, n:], self.filled - n)

    def stack(self, layers: Sequence[Any], width: int, room: int) -> None:
        """Become the rows of `layers` (this one first), right-aligned to `width` positions.

        Zeros before each row's positions (finite, so masked positions add exactly
        nothing), `room` free positions after.
        """
        rows = sum(layer.key_buf.shape[0] for layer in layers)
        shape = (rows, self.key_buf.shape[1], width + room, self.key_buf.shape[-1])
        key, value = self.key_buf.new_zeros(shape), self.value_buf.new_zeros(shape)
        start = 0
        for layer in layers:
            end = start + layer.key_buf.shape[0]
            key[start:end, :, width - layer.filled : width] = layer.keys
            value[start:end, :, width - layer.filled : width] = layer.values
            start = end
        self._set(key, value, width)

    def _set(self, key_buf: Any, value_buf: Any, filled: int) -> None:
        self.key_buf, self.value_buf, self.filled = key_buf, value_buf, filled
        self.keys, self.values = key_buf[:, :, :filled], value_buf[:, :, :filled]


def shared_prefix(rows: list[list[int]]) -> int:
    """How many leading tokens every row shares (each row keeps at least one of its own)."""
    limit = max(min(len(row) for row in rows) - 1, 0)
    first = rows[0]
    for n in range(limit):
        if any(row[n] != first[n] for row in rows):
            return n
    return limit


def length_chunks(lengths: list[int], slack: int) -> list[list[int]]:
    """Positions grouped into runs of similar length, shortest first.

    A run takes the next (longer) row while the padding that adds to the run stays within
    `slack` tokens (`PREFILL_SLACK`: what one more forward pass costs on the device).
    """
    chunks: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (lengths[i], i)):
        if chunks and len(chunks[-1]) * (lengths[i] - lengths[chunks[-1][-1]]) <= slack:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks


@dataclass
class _Running:
    """The rows decoded together and their state.

    Prompt positions, KV cache, next-token logits, the attention mask over the cached
    positions (0 = padding) and each row's last position id.
    """

    ids: list[int]
    cache: Any
    logits: Any
    mask: Any
    positions: Any
    joinable: bool  # every cache layer is preallocated: rows can join and be swap-removed

    def step(self, model: Any, tokens: Any) -> None:
        """Feed each row its next token; the logits become those of the position after it."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.ids), 1)], dim=1)
        self.positions = self.positions + 1
        self.logits = model(
            input_ids=tokens[:, None],
            attention_mask=self.mask,
            position_ids=self.positions,
            cache=self.cache,
            use_cache=True,
        ).logits[:, -1]

    def keep(self, rows: list[int]) -> list[int]:
        """Keep only these batch rows; returns the old row numbers in their new order.

        Preallocated caches are compacted by swap-remove: rows from the tail move into the
        holes that finished rows left in front, so a step copies the few moved rows, not the
        whole cache (a full copy per finished step cost ~15% of a 128-row decode). Cached
        positions that are now padding for every row are cut.
        """
        n = len(rows)
        if self.joinable:
            kept = set(rows)
            holes = [r for r in range(n) if r not in kept]
            movers = [r for r in rows if r >= n]
            order = list(range(n))
            for hole, mover in zip(holes, movers):
                order[hole] = mover
            for layer in self.cache.layers:
                layer.move_rows(holes, movers, n)
        else:
            order = list(rows)
            self.cache.batch_select_indices(torch.tensor(order, device=self.mask.device))
        index = torch.tensor(order, dtype=torch.long, device=self.mask.device)
        self.ids = [self.ids[r] for r in order]
        self.logits, self.mask, self.positions = (
            self.logits[index],
            self.mask[index],
            self.positions[index],
        )
        if rows and self.joinable:
            lead = int(self.mask.any(dim=0).int().argmax())
            if lead:
                self.mask = self.mask[:, lead:]
                for layer in self.cache.layers:
                    layer.drop_front(lead)
        return order

    @staticmethod
    def stack(parts: list[_Running], room: int) -> _Running:
        """One batch of all the parts' rows, right-aligned to the longest cache.

        Shorter caches are left-padded with masked zeros: each row still attends to exactly its
        own tokens at its own positions, as with left padding in one batch. One copy of every
        cache into a new buffer with `room` free positions after the longest.
        """
        first = parts[0]
        if len(parts) == 1:
            return first
        width = max(part.mask.shape[1] for part in parts)
        for layers in zip(*(part.cache.layers for part in parts)):
            layers[0].stack(layers, width, room)

        def padded(mask: Any) -> Any:
            return torch.nn.functional.pad(mask, (width - mask.shape[1], 0))

        first.ids = [i for part in parts for i in part.ids]
        first.mask = torch.cat([padded(part.mask) for part in parts])
        first.logits = torch.cat([part.logits for part in parts])
        first.positions = torch.cat([part.positions for part in parts])
        return first
