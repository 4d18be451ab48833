"""Loading the models a run needs: weights from a transformers directory or a random preset, the tokenizer
beside them (the token table grown to the tokenizer's size, as the reference does), and how they run.

One loader for every model of a run: the trained one (`model`), Embed-RL's frozen embedder and judge, and
a checkpoint under evaluation.
"""

from __future__ import annotations

import jax

from elva_jax.data.tokenize import Tokenizer, generation_vocab, has_tokenizer_files
from elva_jax.model.config import ModelConfig, ModelOptions
from elva_jax.model.hf_checkpoint import load_params, resize_vocab
from elva_jax.model.params import init_params
from elva_jax.model.tiny import preset_config


def load_model(
    checkpoint: str, *, random_preset: str = "", tokenizer: str = "", seed: int = 0, param_dtype: str = "float32"
) -> tuple[ModelConfig, dict, Tokenizer]:
    """(model config, params, tokenizer) of ``checkpoint`` (a transformers directory), or of a random model of
    ``random_preset`` seeded with ``seed`` when ``checkpoint`` is "". The tokenizer comes from ``tokenizer``,
    else the checkpoint's own files, else the bundled Qwen2 files; a token table smaller than the tokenizer is
    grown to it."""
    if checkpoint:
        mcfg, params = load_params(checkpoint, dtype=param_dtype)
    else:
        mcfg = preset_config(random_preset)
        params = init_params(mcfg, jax.random.key(seed), dtype=param_dtype)
    tok_dir = tokenizer or (checkpoint if checkpoint and has_tokenizer_files(checkpoint) else None)
    tok = Tokenizer.from_dir(tok_dir, geometry=mcfg.vision.geometry)
    if tok.vocab_size > mcfg.text.vocab_size:
        params, mcfg = resize_vocab(params, mcfg, tok.vocab_size)
    return mcfg, params, tok


def load_run_model(cfg) -> tuple[ModelConfig, dict, Tokenizer]:
    """The run's trained model (the ``model`` section; random init seeded ``train.seed``)."""
    m = cfg.model
    return load_model(
        m.checkpoint,
        random_preset=m.random_preset,
        tokenizer=m.tokenizer,
        seed=cfg.train.seed,
        param_dtype=m.param_dtype,
    )


def model_options(cfg, tokenizer=None) -> ModelOptions:
    """The model's run options from ``cfg.model``; with ``tokenizer`` also the generation vocabulary of
    ``model.generation_words`` (what generates: summaries, rollouts; embeddings do not need it)."""
    m = cfg.model
    vocab = generation_vocab(tokenizer, m.generation_words) if tokenizer is not None else ()
    return ModelOptions(
        dtype=m.dtype, param_dtype=m.param_dtype, position_mode=m.position_mode, remat=m.remat, vocab=vocab
    )
