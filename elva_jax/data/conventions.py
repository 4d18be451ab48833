"""The embedding conventions: how each published recipe turns an input into one vector.

A convention fixes the prompt (`PromptEncoder` template), where a task instruction goes, which final
hidden state is the embedding, and whether the model first writes text of its own. Every stage reads
this one registry: the contrastive stage (``train.embedding``), evaluation (``eval.mode``), mining RL
negatives (``rl.mining_embedding``) and the comparison tool.

=============  ==============  ===========  ================================================  ==========
name           template        instruction  pooled hidden state                               generates
=============  ==============  ===========  ================================================  ==========
eol            eol (LamRA)     user         before the last ``<emb>`` (the ``\\n`` closing     no
                                            ``<|im_start|>assistant``)
last           eol (LamRA)     user         the last real token                               no
ret            ret (ELVA)      user         the last ``[RET]``, after the model's summary     yes
instruct_last  instruct_last   system       the last real token (Qwen3-VL-Embedding)          no
tcot           tcot            (none)       at ``<emb>`` after the side's T-CoT (Embed-RL)    no
=============  ==============  ===========  ================================================  ==========

"user": the instruction precedes the side's text in the user turn; "system": it is the system turn
(``data.default_instruction`` for a side without one).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from elva_jax.model.embedding import eol_embedding, last_token_embedding, ret_embedding

POOLINGS = ("before_emb", "last_token", "at_ret", "at_emb")


@dataclasses.dataclass(frozen=True)
class Convention:
    """One embedding convention (see the module table)."""

    name: str
    template: str  # the PromptEncoder template ("eol", "ret", "instruct_last") or "tcot" (Embed-RL's embedder rows)
    instruction: str  # "user" | "system" | "none"
    pooling: str  # one of POOLINGS
    generates: bool  # the model writes a summary before the pooled token (sampled, then teacher-forced)
    trainable: bool  # a contrastive stage can train it (train.embedding)
    source: str  # whose convention it is

    def pool(self, hidden, input_ids, attention_mask, *, emb_token_id: int, ret_token_id: int) -> jnp.ndarray:
        """The L2-normalised embedding [B, D] (fp32) of final hidden states [B, L, D] in this convention."""
        if self.pooling == "before_emb":
            return eol_embedding(hidden, input_ids, emb_token_id, attention_mask)
        if self.pooling == "last_token":
            return last_token_embedding(hidden, attention_mask)
        if self.pooling == "at_ret":
            return ret_embedding(hidden, input_ids, ret_token_id, attention_mask)
        return ret_embedding(hidden, input_ids, emb_token_id, attention_mask)  # at_emb: the last <emb>


CONVENTIONS: dict[str, Convention] = {
    c.name: c
    for c in (
        Convention("eol", "eol", "user", "before_emb", generates=False, trainable=True, source="LamRA"),
        Convention("last", "eol", "user", "last_token", generates=False, trainable=True, source="LamRA prompt"),
        Convention("ret", "ret", "user", "at_ret", generates=True, trainable=False, source="ELVA"),
        Convention(
            "instruct_last",
            "instruct_last",
            "system",
            "last_token",
            generates=False,
            trainable=True,
            source="Qwen3-VL-Embedding",
        ),
        Convention("tcot", "tcot", "none", "at_emb", generates=False, trainable=False, source="Embed-RL embedder"),
    )
}

#: conventions a contrastive stage trains (``train.embedding``)
TRAINABLE = tuple(n for n, c in CONVENTIONS.items() if c.trainable)
#: conventions a checkpoint is evaluated in (``eval.mode``, ``train.eval_modes``); "tcot" comes with ``--cot``
EVALUATED = ("eol", "ret", "instruct_last")
#: conventions RL negatives are mined in: one forward, no generation (``rl.mining_embedding``)
MINING = ("eol", "instruct_last")


def convention(name: str) -> Convention:
    """The registered convention ``name`` (a ValueError naming the known ones otherwise)."""
    if name not in CONVENTIONS:
        raise ValueError(f"unknown embedding convention {name!r}; one of {sorted(CONVENTIONS)}")
    return CONVENTIONS[name]
