"""The T-CoT parser against a hand-written table of good and bad responses, and its "tags" check
against the official format check (Embed-RL's regex, transcribed here as the oracle) on the table and
on random tag soups. Totality: random byte soups never raise."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from elva_jax.data.tcot.parser import REASONS, TAGS, expected_evidence, format_flags, parse_tcot

# Embed-RL's check_format (verl/workers/reward_model/vlm2vec_reward.py): re.search with DOTALL
OFFICIAL = re.compile(r"<thinking>.*?</thinking>.*?<rethink>.*?</rethink>.*?<answer>.*?</answer>", re.DOTALL)


def official_ok(text: str) -> bool:
    return OFFICIAL.search(text) is not None


def cot(thinking: str, rethink: str = "The evidence fits.", answer: str = "A dog on a sofa.") -> str:
    return f"<thinking>{thinking}</thinking>\n<rethink>{rethink}</rethink>\n<answer>{answer}</answer>"


KW = 'A dog. {"text_keywords": ["dog", "sofa"]}'
BOX = 'The bear at [220, 150, 380, 320]. {"bbox_2d": [220, 150, 380, 320]}'
FR = 'Frames 1 and 4. {"key_frames": [1, 4]}'

# (name, text, kwargs, expected reason ("" = good))
TABLE = [
    ("keywords", cot(KW), {}, ""),
    ("one_box", cot(BOX), {}, ""),
    ("box_list", cot('Two cars. {"bbox_2d": [[120, 200, 280, 280], [320, 180, 480, 300]]}'), {}, ""),
    ("float_box_at_edges", cot('{"bbox_2d": [0, 0.5, 1000, 999.5]}'), {}, ""),
    ("key_frames", cot(FR), {"num_frames": 8}, ""),
    ("last_frame", cot('{"key_frames": [8]}'), {"num_frames": 8}, ""),
    ("zero_based_frames", cot('{"key_frames": [0, 7]}'), {"num_frames": 8, "frame_base": 0}, ""),
    ("outer_whitespace", "\n  " + cot(KW) + "\n", {}, ""),
    ("expected_kind", cot(BOX), {"expected": "bbox_2d"}, ""),
    ("not_text", None, {}, "not_text"),
    ("empty", "", {}, "missing_tag"),
    ("no_answer", "<thinking>" + KW + "</thinking><rethink>r</rethink>", {}, "missing_tag"),
    ("rethinking_typo", cot(KW).replace("rethink>", "rethinking>"), {}, "missing_tag"),
    ("two_answers", cot(KW) + "<answer>again</answer>", {}, "duplicate_tag"),
    (
        "answer_first",
        "<answer>A.</answer><thinking>" + KW + "</thinking><rethink>r</rethink>",
        {},
        "tags_out_of_order",
    ),
    ("preamble", "Sure! " + cot(KW), {}, "text_outside_blocks"),
    ("between_blocks", cot(KW).replace("\n<rethink>", " so\n<rethink>"), {}, "text_outside_blocks"),
    ("blank_answer", cot(KW, answer="  "), {}, "empty_block"),
    ("blank_rethink", cot(KW, rethink=""), {}, "empty_block"),
    ("no_json", cot("Just prose."), {}, "no_evidence"),
    ("empty_object", cot("{}"), {}, "no_evidence"),
    ("trailing_comma", cot('{"text_keywords": ["dog",]}'), {}, "bad_json"),
    ("single_quotes", cot("{'bbox_2d': [1, 2, 3, 4]}"), {}, "bad_json"),
    ("unclosed", cot('{"key_frames": [1, 2'), {"num_frames": 4}, "bad_json"),
    ("nan", cot('{"bbox_2d": [NaN, 1, 2, 3]}'), {}, "bad_json"),
    ("lone_brace", cot("[1, 2, 3, 4]  {"), {}, "bad_json"),
    ("two_objects", cot('{"text_keywords": ["a"]} and {"text_keywords": ["b"]}'), {}, "multiple_evidence"),
    ("unknown_key", cot('{"boxes": [1, 2, 3, 4]}'), {}, "unknown_evidence_key"),
    ("two_keys", cot('{"text_keywords": ["a"], "bbox_2d": [1, 2, 3, 4]}'), {}, "multiple_evidence_keys"),
    ("wrong_kind", cot(KW), {"expected": "bbox_2d"}, "wrong_evidence_kind"),
    ("keywords_empty", cot('{"text_keywords": []}'), {}, "bad_keywords"),
    ("keywords_not_str", cot('{"text_keywords": ["dog", 3]}'), {}, "bad_keywords"),
    ("keywords_blank", cot('{"text_keywords": ["dog", " "]}'), {}, "bad_keywords"),
    ("box_three", cot('{"bbox_2d": [1, 2, 3]}'), {}, "bbox_malformed"),
    ("box_string", cot('{"bbox_2d": ["1", 2, 3, 4]}'), {}, "bbox_malformed"),
    ("box_bool", cot('{"bbox_2d": [true, 2, 3, 4]}'), {}, "bbox_malformed"),
    ("box_list_empty", cot('{"bbox_2d": []}'), {}, "bbox_malformed"),
    ("box_list_mixed", cot('{"bbox_2d": [[1, 2, 3, 4], [5, 6]]}'), {}, "bbox_malformed"),
    ("box_over_1000", cot('{"bbox_2d": [10, 20, 1001, 40]}'), {}, "bbox_out_of_range"),
    ("box_negative", cot('{"bbox_2d": [[-1, 20, 30, 40]]}'), {}, "bbox_out_of_range"),
    ("box_flipped", cot('{"bbox_2d": [300, 20, 100, 40]}'), {}, "bbox_empty"),
    ("box_zero_area", cot('{"bbox_2d": [100, 40, 200, 40]}'), {}, "bbox_empty"),
    ("frames_float", cot('{"key_frames": [1.0, 2]}'), {"num_frames": 4}, "key_frames_malformed"),
    ("frames_empty", cot('{"key_frames": []}'), {"num_frames": 4}, "key_frames_malformed"),
    ("frames_scalar", cot('{"key_frames": 3}'), {"num_frames": 4}, "key_frames_malformed"),
    ("frames_no_video", cot(FR), {}, "key_frames_without_video"),
    ("frame_past_end", cot('{"key_frames": [1, 9]}'), {"num_frames": 8}, "key_frame_out_of_range"),
    ("frame_zero_one_based", cot('{"key_frames": [0, 2]}'), {"num_frames": 8}, "key_frame_out_of_range"),
]


@pytest.mark.parametrize("name,text,kw,reason", TABLE, ids=[t[0] for t in TABLE])
def test_table(name, text, kw, reason):
    p = parse_tcot(text, **kw)
    assert p.reason == reason
    assert p.ok == (reason == "")


def test_table_covers_every_reason():
    assert {r for *_, r in TABLE} - {""} == set(REASONS)
    assert len(TABLE) >= 20


def test_parsed_fields():
    p = parse_tcot(cot('Two cars. {"bbox_2d": [[120, 200, 280, 280], [320, 180, 480, 300]]}'))
    assert p.evidence_kind == "bbox_2d" and p.boxes == ((120, 200, 280, 280), (320, 180, 480, 300))
    assert p.answer == "A dog on a sofa." and p.rethink == "The evidence fits." and p.thinking.startswith("Two")
    p = parse_tcot(cot(FR), num_frames=8)
    assert (p.evidence_kind, p.frames) == ("key_frames", (1, 4))
    assert parse_tcot(cot(KW)).keywords == ("dog", "sofa")


def test_tags_check_is_the_official_one_on_the_table():
    for name, text, _, _ in TABLE:
        if isinstance(text, str):
            assert parse_tcot(text, check="tags").ok == official_ok(text), name
    # the official check ignores what the strict one refuses: evidence, extra text, repeats, blanks
    for text in (cot("no json"), "Sure! " + cot(KW) + " bye", cot(KW) + cot(KW), cot("", "", "")):
        assert official_ok(text) and parse_tcot(text, check="tags").ok and not parse_tcot(text).ok


def test_tags_check_blocks_are_the_regex_groups():
    rx = re.compile(r"<thinking>(.*?)</thinking>.*?<rethink>(.*?)</rethink>.*?<answer>(.*?)</answer>", re.DOTALL)
    rng = random.Random(1)
    pieces = [*TAGS, "x", " ", "<", "</", "think", "ing>"]
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 14)))
        m = rx.search(text)
        p = parse_tcot(text, check="tags")
        assert p.ok == (m is not None), text
        if m:
            assert (p.thinking, p.rethink, p.answer) == m.groups(), text


def test_total_on_random_text():
    rng = random.Random(2)
    alphabet = [*TAGS, "{", "}", "[", "]", '"', ",", ":", "1", "-", "e9", "NaN", "bbox_2d", "key_frames", "a", " "]
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        for check in ("strict", "tags"):
            p = parse_tcot(text, check=check, num_frames=rng.choice([None, 3]))
            assert p.reason in ("", *REASONS)
    deep = cot('{"text_keywords": ' + "[" * 100000 + "]" * 100000 + "}")  # recursion depth in json
    assert parse_tcot(deep).reason in ("bad_json", "bad_keywords")
    assert parse_tcot(cot('{"bbox_2d": [' + "9" * 5000 + ", 1, 2, 3]}")).reason in ("bad_json", "bbox_out_of_range")


def test_format_flags_counts_reasons():
    texts = [cot(KW), "nothing", cot(FR), cot(FR), cot(BOX)]
    flags, reasons = format_flags(texts, num_frames=[None, None, 8, None, None], expected=[None] * 4 + ["bbox_2d"])
    np.testing.assert_array_equal(flags, [1, 0, 1, 0, 1])
    assert flags.dtype == np.float32
    assert reasons == {"missing_tag": 1, "key_frames_without_video": 1}
    with pytest.raises(ValueError, match="2 responses"):
        format_flags(["a", "b"], num_frames=[None])


TEXT_SIDE = {"text": "a dog on a sofa"}
IMAGE_SIDE = {"image": "dog.jpg"}
IMAGE_TEXT_SIDE = {"image": "dog.jpg", "text": "Find a similar photo.", "instruction": "Retrieve."}
VIDEO_SIDE = {"video": "clip.mp4", "text": "What happens?"}

# (side, evidence, num_frames, strict reason with the side's kind): the official prompts' rule by modality
MODALITY_TABLE = [
    (TEXT_SIDE, KW, None, ""),
    (TEXT_SIDE, BOX, None, "wrong_evidence_kind"),
    (TEXT_SIDE, FR, 8, "wrong_evidence_kind"),
    (IMAGE_SIDE, BOX, None, ""),
    (IMAGE_SIDE, KW, None, "wrong_evidence_kind"),
    (IMAGE_TEXT_SIDE, BOX, None, ""),  # an image with text: boxes (PROMPT_IMAGE / PROMPT_POS_IMAGE)
    (IMAGE_TEXT_SIDE, KW, None, "wrong_evidence_kind"),
    (VIDEO_SIDE, FR, 8, ""),
    (VIDEO_SIDE, KW, 8, "wrong_evidence_kind"),
    (VIDEO_SIDE, BOX, 8, "wrong_evidence_kind"),
    (IMAGE_SIDE, '{"bbox_2d": [5, 5, 1, 1]}', None, "bbox_empty"),  # the right kind, still checked
]


@pytest.mark.parametrize("side, evidence, frames, reason", MODALITY_TABLE)
def test_evidence_kind_by_modality(side, evidence, frames, reason):
    text = cot(evidence)
    got = parse_tcot(text, expected=expected_evidence(side), num_frames=frames)
    assert got.reason == reason
    # "any" kind (expected None): only the evidence itself is checked; the official "tags" check passes all
    anykind = parse_tcot(text, num_frames=frames).reason
    assert anykind == ("bbox_empty" if reason == "bbox_empty" else "")
    assert parse_tcot(text, check="tags").ok and official_ok(text)


def test_expected_evidence():
    assert [expected_evidence(x) for x in (TEXT_SIDE, IMAGE_SIDE, IMAGE_TEXT_SIDE, VIDEO_SIDE, {})] == [
        "text_keywords",
        "bbox_2d",
        "bbox_2d",
        "key_frames",
        "text_keywords",
    ]
    sides = [TEXT_SIDE, IMAGE_SIDE, TEXT_SIDE]
    flags, reasons = format_flags([cot(KW), cot(KW), cot(BOX)], expected=[expected_evidence(x) for x in sides])
    np.testing.assert_array_equal(flags, [1, 0, 0])
    assert reasons == {"wrong_evidence_kind": 2}


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="check"):
        parse_tcot(cot(KW), check="loose")
    with pytest.raises(ValueError, match="expected"):
        parse_tcot(cot(KW), expected="image")
