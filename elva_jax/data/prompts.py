"""Prompts: the Qwen2-VL chat template, LamRA's EOL templates, ELVA's generative `[RET]` template and
Qwen3-VL-Embedding's instruction-as-system template.

Every builder returns a :class:`Prompt`: the chat ``messages`` (content items ``{"type": "image"}`` and
``{"type": "text", "text": ...}``, the format transformers' ``apply_chat_template`` takes) plus how to
render them. The user's own text (instruction + query / candidate text) is its own text item marked
``"truncatable": True``; the fixed template sentences are separate text items. The Qwen2-VL template
concatenates text items, so the split changes nothing in the rendered string; it only tells
:mod:`elva_jax.data.tokenize` which characters it may cut.

Rendering is pure Python (:func:`render_chat`) and equals
``tokenizer.apply_chat_template(messages, chat_template=QWEN_VL_CHAT_TEMPLATE, tokenize=False)``
(tested), so the data path needs neither jinja2 nor transformers.

LamRA (stages 1-2, embedding = hidden state just before ``<emb>``)::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\n{image}{TXT}\\nSummarize above image and sentence in one word: <|im_end|>\\n
    <|im_start|>assistant\\n<emb>.<|im_end|>\\n

ELVA (stage 3 / evaluation, embedding = hidden state at the last ``[RET]``)::

    <|im_start|>user\\n{image}{TXT}\\nAnalyze and summarize ... the special token [RET] to represent the
    entire input.<|im_end|>\\n<|im_start|>assistant\\n{summary} [RET]<|im_end|>\\n

(system turn as above; the generation form ends after ``<|im_start|>assistant\\n``). TXT is
``format_string(f"{instruction} {text}")`` for queries and ``format_string(text)`` for candidates in
both families; an image-only query with an instruction uses the instruction as its text. The ELVA
sentence follows TXT after one newline, exactly like LamRA's "Summarize above ..." sentence.

Qwen3-VL-Embedding, convention "instruct_last" (embedding = L2-normalised hidden state of the last real
token, i.e. the ``\\n`` closing ``<|im_start|>assistant\\n``)::

    <|im_start|>system\\n{INSTRUCTION}<|im_end|>\\n
    <|im_start|>user\\n{image}{text}<|im_end|>\\n
    <|im_start|>assistant\\n

INSTRUCTION is the query's task instruction (stripped, and ended with "." unless it ends in punctuation, as
the official code does: :func:`qwen3_embedding_instruction`), or :data:`DEFAULT_EMBED_INSTRUCTION` ("Represent
the user's input.") for anything without one (candidates; queries when instructions are off); user content is the
images, then the text verbatim (no ``format_string``, no instruction prefix, no template sentence); the
chat template is applied with the generation prompt and nothing follows it. This is the public code's
convention (QwenLM/Qwen3-VL-Embedding, ``src/models/qwen3_vl_embedding.py``: instruction as the system
message, videos / images / text in the user turn, ``apply_chat_template(..., add_generation_prompt=True)``,
right padding, last non-pad token). The tech report also mentions an appended ``<|endoftext|>``; we
follow the code, the reference implementation the released checkpoints are run with, and append nothing
(``<|endoftext|>`` is the pad id here, so right-padded rows carry it only as masked padding). A system
turn is always present, so the Qwen2-VL template's default system turn never fires for these prompts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import unicodedata
import zlib
from collections.abc import Sequence

__all__ = [
    "DEFAULT_EMBED_INSTRUCTION",
    "DEFAULT_SYSTEM_PROMPT",
    "ELVA_INSTRUCTION",
    "ELVA_SUFFIX",
    "EMB_TOKEN",
    "IMAGE_PLACEHOLDER",
    "LAMRA_ASSISTANT",
    "LAMRA_IMAGE_SUFFIX",
    "LAMRA_IMAGE_TEXT_SUFFIX",
    "LAMRA_TEXT_SUFFIX",
    "LAMRA_VIDEO_SUFFIX",
    "LAMRA_VIDEO_TEXT_SUFFIX",
    "QWEN_VL_CHAT_TEMPLATE",
    "RET_TOKEN",
    "TCOT_JUDGE_INSTRUCTION",
    "TCOT_REASONER_INSTRUCTION",
    "TCOT_SUMMARISE_INSTRUCTION",
    "VIDEO_PLACEHOLDER",
    "Prompt",
    "choose_instruction",
    "elva_prompt",
    "format_string",
    "instruct_prompt",
    "lamra_prompt",
    "prompt_text",
    "qwen3_embedding_instruction",
    "raw_prompt",
    "render_chat",
    "render_content",
    "tcot_embed_prompt",
    "tcot_judge_prompt",
    "tcot_reasoner_prompt",
]

EMB_TOKEN = "<emb>"
RET_TOKEN = "[RET]"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
#: Qwen3-VL-Embedding's default instruction: the system message of every input without its own.
DEFAULT_EMBED_INSTRUCTION = "Represent the user's input."
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"

LAMRA_TEXT_SUFFIX = "\nSummarize above sentence in one word: "
LAMRA_IMAGE_SUFFIX = "\nSummarize above image in one word: "
LAMRA_IMAGE_TEXT_SUFFIX = "\nSummarize above image and sentence in one word: "
#: LamRA has no video prompt; a video side reads as an image side with "video" for "image" (this project's choice)
LAMRA_VIDEO_SUFFIX = "\nSummarize above video in one word: "
LAMRA_VIDEO_TEXT_SUFFIX = "\nSummarize above video and sentence in one word: "
LAMRA_ASSISTANT = EMB_TOKEN + "."

#: ELVA's fixed request (method.md), verbatim.
ELVA_INSTRUCTION = (
    "Analyze and summarize the key information of the above input. "
    "Finally, append the special token [RET] to represent the entire input."
)
#: What follows the user's text (or the image when there is no text): one newline, then the request.
ELVA_SUFFIX = "\n" + ELVA_INSTRUCTION

#: Embed-RL reasoner request (ours, in the spirit of the official T-CoT prompts, not their text): after
#: the side's text (or image), the reasoner writes its evidence, a rethink and an answer.
TCOT_REASONER_INSTRUCTION = (
    "Reason about the input above. In <thinking></thinking> give your evidence as one JSON object: "
    '{"text_keywords": [...]} for text, {"bbox_2d": [x1, y1, x2, y2]} in 0-1000 coordinates for an image, '
    'or {"key_frames": [...]} (1-based) for a video. Then check it in <rethink></rethink> and state what '
    "the input is about in <answer></answer>."
)
#: What follows the CoT in the Embed-RL embedder's user turn (ours); the assistant turn is ``<emb>``.
TCOT_SUMMARISE_INSTRUCTION = "Summarize the above input and its reasoning in one word: "
#: Embed-RL judge request (ours; the official judge prompt's structure, not its text): which of the numbered
#: candidate reasonings matches the query's, answered with its number alone.
TCOT_JUDGE_INSTRUCTION = (
    "Below are a query with its reasoning and numbered candidate reasonings. Which candidate matches the "
    "query best? Reply with the candidate's number only."
)

#: Qwen2-VL's chat template (jinja, for transformers' ``apply_chat_template``). A default system turn
#: when the first message is not a system message; images / videos render as vision placeholders
#: ("Picture k: " / "Video k: " prefixes with ``add_vision_id``); ``add_generation_prompt`` opens an
#: assistant turn. :func:`render_chat` is the same function in Python.
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def format_string(s: str | None) -> str:
    """LamRA / UniIR text normalisation: drop ``\\r``, strip, strip surrounding double quotes, upper-case
    the first letter and append "." unless the text ends with ".", "?" or "!" ("" stays "")."""
    s = (s or "").replace("\r", "").strip().strip('"')
    if s:
        s = s[0].upper() + s[1:]
        if s[-1] not in ".?!":
            s += "."
    return s


def choose_instruction(
    instructions: Sequence[str], qid: str, *, seed: int | None = None, fixed_index: int | None = None
) -> str:
    """Deterministic instruction for query ``qid`` (the reference draws one at random, unseeded).

    ``fixed_index``: always that prompt. Otherwise prompt ``h % len(instructions)`` with
    ``h = crc32(qid)`` when ``seed`` is None (the rule of :mod:`elva_jax.data.pipeline`), else
    ``h = blake2b(f"{seed}:{qid}")`` read as a 64-bit big-endian integer. Stable across runs,
    processes and Python versions (no ``hash()``).
    """
    if not instructions:
        raise ValueError(f"no instructions to choose from for query {qid!r}")
    n = len(instructions)
    if fixed_index is not None:
        if not -n <= fixed_index < n:
            raise IndexError(f"fixed_index {fixed_index} out of range for {n} instructions")
        return instructions[fixed_index]
    if seed is None:
        h = zlib.crc32(qid.encode("utf-8"))
    else:
        h = int.from_bytes(hashlib.blake2b(f"{seed}:{qid}".encode(), digest_size=8).digest(), "big")
    return instructions[h % n]


def prompt_text(text: str | None = None, instruction: str | None = None) -> str:
    """TXT of both template families: ``format_string(f"{instruction} {text}")`` with an instruction
    (just the instruction when there is no text), else ``format_string(text)``; "" when neither."""
    text = text or ""
    if instruction:
        return format_string(f"{instruction} {text}" if text.strip() else instruction)
    return format_string(text)


@dataclasses.dataclass(frozen=True)
class Prompt:
    """Chat messages plus how to render them.

    add_generation_prompt: open an assistant turn at the end (generation). chat: False for the "raw"
    form (the user content alone, no chat wrapper). ``rendered`` is the text the tokenizer sees before
    each ``<|image_pad|>`` is expanded.
    """

    messages: tuple[dict, ...]
    add_generation_prompt: bool = False
    chat: bool = True

    @property
    def rendered(self) -> str:
        if not self.chat:
            return render_content(self.messages[0]["content"])
        return render_chat(self.messages, add_generation_prompt=self.add_generation_prompt)

    @property
    def n_images(self) -> int:
        return sum(1 for m in self.messages if not isinstance(m["content"], str) for c in m["content"] if _is_image(c))


def _is_image(c: dict) -> bool:
    return c.get("type") == "image" or "image" in c or "image_url" in c


def _is_video(c: dict) -> bool:
    return c.get("type") == "video" or "video" in c


def render_content(content: str | Sequence[dict], add_vision_id: bool = False, counts: list[int] | None = None) -> str:
    """One message's content as the Qwen2-VL template writes it (without the turn markers)."""
    if isinstance(content, str):
        return content
    counts = [0, 0] if counts is None else counts
    out = []
    for c in content:
        if _is_image(c):
            counts[0] += 1
            out.append((f"Picture {counts[0]}: " if add_vision_id else "") + IMAGE_PLACEHOLDER)
        elif _is_video(c):
            counts[1] += 1
            out.append((f"Video {counts[1]}: " if add_vision_id else "") + VIDEO_PLACEHOLDER)
        elif "text" in c:
            out.append(str(c["text"]))
    return "".join(out)


def render_chat(messages: Sequence[dict], *, add_generation_prompt: bool = False, add_vision_id: bool = False) -> str:
    """Python rendering of :data:`QWEN_VL_CHAT_TEMPLATE` (same string as transformers gives)."""
    out, counts = [], [0, 0]
    for i, m in enumerate(messages):
        if i == 0 and m["role"] != "system":
            out.append(f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n")
        out.append(f"<|im_start|>{m['role']}\n{render_content(m['content'], add_vision_id, counts)}<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


def _user_content(n_images: int, txt: str, suffix: str, n_videos: int = 0) -> list[dict]:
    content: list[dict] = [{"type": "video"} for _ in range(n_videos)] + [{"type": "image"} for _ in range(n_images)]
    if txt:
        content.append({"type": "text", "text": txt, "truncatable": True})
    if suffix:
        content.append({"type": "text", "text": suffix})
    return content


def _check(text: str, n_images: int, n_videos: int = 0) -> None:
    if n_images < 0 or n_videos < 0:
        raise ValueError(f"n_images and n_videos must be >= 0, got {n_images}, {n_videos}")
    if not text and not n_images and not n_videos:
        raise ValueError("a prompt needs text, an instruction, an image or a video")


def lamra_prompt(
    text: str | None = None,
    n_images: int = 0,
    instruction: str | None = None,
    *,
    with_assistant: bool = True,
    n_videos: int = 0,
) -> Prompt:
    """LamRA EOL prompt: user turn by modality (text / image / image+text template), assistant ``<emb>.``.

    Queries pass their instruction (image-only queries then use the image+text template with the
    instruction as text); candidates pass none. ``with_assistant=False`` leaves the assistant turn out.
    Videos (``n_videos``, placed before the images) use :data:`LAMRA_VIDEO_SUFFIX` /
    :data:`LAMRA_VIDEO_TEXT_SUFFIX` (rows with videos are encoded by ``Tokenizer.encode_prompt(videos=...)``).
    """
    txt = prompt_text(text, instruction)
    _check(txt, n_images, n_videos)
    if n_videos:
        suffix = LAMRA_VIDEO_TEXT_SUFFIX if txt else LAMRA_VIDEO_SUFFIX
    elif n_images:
        suffix = LAMRA_IMAGE_TEXT_SUFFIX if txt else LAMRA_IMAGE_SUFFIX
    else:
        suffix = LAMRA_TEXT_SUFFIX
    msgs = [{"role": "user", "content": _user_content(n_images, txt, suffix, n_videos)}]
    if with_assistant:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": LAMRA_ASSISTANT}]})
    return Prompt(tuple(msgs))


def elva_prompt(
    text: str | None = None,
    n_images: int = 0,
    instruction: str | None = None,
    *,
    summary: str | None = None,
    generation: bool = False,
    n_videos: int = 0,
) -> Prompt:
    """ELVA generative prompt: user turn ``{video}{image}{TXT}`` + :data:`ELVA_SUFFIX`.

    ``generation=True``: no assistant turn, an open ``<|im_start|>assistant\\n`` (the model writes the
    summary and ``[RET]``). Otherwise the teacher-forced assistant turn ``f"{summary} [RET]"``
    (just ``[RET]`` when ``summary`` is empty or None).
    """
    txt = prompt_text(text, instruction)
    _check(txt, n_images, n_videos)
    msgs = [{"role": "user", "content": _user_content(n_images, txt, ELVA_SUFFIX, n_videos)}]
    if generation:
        if summary:
            raise ValueError("generation=True takes no summary (the model writes it)")
        return Prompt(tuple(msgs), add_generation_prompt=True)
    answer = f"{summary} {RET_TOKEN}" if summary else RET_TOKEN
    msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return Prompt(tuple(msgs))


def qwen3_embedding_instruction(instruction: str | None) -> str | None:
    """An instruction as Qwen3-VL-Embedding's official code writes it into the system turn: stripped, and
    ended with "." unless its last character is Unicode punctuation (category P*); nothing left after the
    strip is no instruction (None: the default instruction, which is used as given)."""
    s = (instruction or "").strip()
    if not s:
        return None
    return s if unicodedata.category(s[-1]).startswith("P") else s + "."


def instruct_prompt(
    text: str | None = None,
    n_images: int = 0,
    instruction: str | None = None,
    *,
    default_instruction: str = DEFAULT_EMBED_INSTRUCTION,
    n_videos: int = 0,
) -> Prompt:
    """Qwen3-VL-Embedding prompt ("instruct_last"): system turn = ``instruction`` (queries; normalised by
    :func:`qwen3_embedding_instruction`) or ``default_instruction`` (candidates, or no instruction); user
    turn = the videos, then the images, then ``text`` verbatim (the truncatable item); the generation prompt
    ``<|im_start|>assistant\\n`` closes the row. Prompts with videos are encoded with
    ``Tokenizer.encode_video_prompt``.
    """
    system = qwen3_embedding_instruction(instruction) or default_instruction
    if not system:
        raise ValueError("the instruct_last prompt needs an instruction or a non-empty default instruction")
    txt = text or ""
    _check(txt, n_images, n_videos)
    msgs = (
        {"role": "system", "content": [{"type": "text", "text": system}]},
        {"role": "user", "content": _user_content(n_images, txt, "", n_videos)},
    )
    return Prompt(msgs, add_generation_prompt=True)


def raw_prompt(text: str | None = None, n_images: int = 0, *, n_videos: int = 0) -> Prompt:
    """No template: the videos' then the images' placeholders, then ``text`` verbatim, without a chat wrapper."""
    text = text or ""
    _check(text, n_images, n_videos)
    return Prompt(({"role": "user", "content": _user_content(n_images, text, "", n_videos)},), chat=False)


def tcot_reasoner_prompt(
    text: str | None = None, n_images: int = 0, instruction: str | None = None, *, request: str, n_videos: int = 0
) -> Prompt:
    """Embed-RL reasoner generation prompt: user turn ``{video}{image}{TXT}\n{request}``, an open
    assistant turn (the reasoner writes the T-CoT and ``<|im_end|>``)."""
    txt = prompt_text(text, instruction)
    _check(txt, n_images, n_videos)
    msgs = ({"role": "user", "content": _user_content(n_images, txt, "\n" + request, n_videos)},)
    return Prompt(msgs, add_generation_prompt=True)


def tcot_embed_prompt(
    text: str | None = None,
    n_images: int = 0,
    instruction: str | None = None,
    *,
    cot: str,
    request: str,
    n_videos: int = 0,
) -> Prompt:
    """Embed-RL embedder prompt: the CoT appended to the side's user turn, then the summarise request:
    user ``{video}{image}{TXT}\n{cot}\n{request}``, assistant ``<emb>``. TXT and CoT form the truncatable
    item (an over-long row loses the CoT's tail first); the embedding is the hidden state at ``<emb>``."""
    txt = prompt_text(text, instruction)
    body = f"{txt}\n{cot}" if txt else cot
    _check(body, n_images, n_videos)
    msgs = (
        {"role": "user", "content": _user_content(n_images, body, "\n" + request, n_videos)},
        {"role": "assistant", "content": [{"type": "text", "text": EMB_TOKEN}]},
    )
    return Prompt(msgs)


def tcot_judge_prompt(query: str, query_cot: str, candidate_cots: Sequence[str], *, request: str) -> Prompt:
    """Embed-RL judge (PRM) prompt, text only (the official judge sees no images): user turn
    ``{request}\n\nQuery: {query}\nReasoning: {query_cot}\n\nCandidates:\n1. {cot_1}\n...\nK. {cot_K}\n\n
    Answer with a number from 1 to K.``, an open assistant turn (the judge answers and ``<|im_end|>``).
    Nothing is truncatable: the caller refuses a prompt that does not fit."""
    if not candidate_cots:
        raise ValueError("a judge prompt needs at least one candidate")
    cands = "\n".join(f"{k}. {c}" for k, c in enumerate(candidate_cots, 1))
    body = (
        f"{request}\n\nQuery: {query}\nReasoning: {query_cot}\n\nCandidates:\n{cands}\n\n"
        f"Answer with a number from 1 to {len(candidate_cots)}."
    )
    return Prompt(({"role": "user", "content": [{"type": "text", "text": body}]},), add_generation_prompt=True)
