"""A small, seeded multi-grain retrieval dataset written in M-BEIR layout (dataset id 10, "multigrain").

A *scene* is 1-3 objects on a light background, each in its own cell of a 3x3 grid. Its *grains*:
per object colour (6), shape (4), size (2), position (9 cells); plus the object count. Captions name
every grain, e.g. ``"two shapes: a small red circle at the top left and a large blue square at the
bottom"`` (objects in reading order). A *one-grain variant* changes one attribute of one object, or
adds/removes one object (count). Every scene in a dataset (both splits, variants included) is unique, so
a variant is never a second positive, and hard negatives (``neg_cand_list``) differ from the positive in
exactly one grain.

Per base scene S (``n_train`` / ``n_test`` per split; one query per task), with K = 3 variants N_k(S):

- task 0 t->i: caption(S) -> image of S; negatives: images of N_k(S).
- task 1 t->t: paraphrase(S) -> caption(S); negatives: captions of N_k(S).
- task 3 i->t: image of S -> caption(S); negatives: captions of N_k(S).
- task 4 i->i: image of S -> another rendering of S (jitter, background, colour noise, size); negatives:
  images of N_k(S).
- task 7 (i,t)->i: image of S + edit text ("make the small red circle at the top left blue") -> image of
  T = N_1(S); negatives: a rendering of S (edit ignored) and images of two variants of T.

Layout under ``root`` (docs/data.md; ``{t}`` is the task id)::

    query/{train,test}/mbeir_multigrain_task{t}_{split}.jsonl, query/train/mbeir_multigrain_union_train.jsonl
    cand_pool/local/mbeir_multigrain_task{t}_cand_pool.jsonl           test candidates of task t
    cand_pool/global/mbeir_multigrain_union_{train,test}_cand_pool.jsonl
    qrels/test/mbeir_multigrain_task{t}_test_qrels.txt
    instructions/query_instructions.tsv
    images/multigrain/{split}/{scene_id}_r{k}.png                       84..112 px per side
    mrbench/...                  MRBench-style subset (tasks 0, 3, 4, 7; query scene with >= 2 objects)
    nli/multigrain_nli_train.csv sent0 = caption, sent1 = paraphrase, hard_neg = one-grain variant caption
    meta/scenes.jsonl, meta/candidates.jsonl (did -> scene), meta/query_grains.jsonl, meta/summary.json

``meta/query_grains.jsonl`` lists, per qid, the grain phrases with kind, object index, role and the
character span in ``text`` (the query text, or the query scene's caption for image-only queries).
Output is byte-identical for the same seed and sizes.

Modules: :mod:`.scenes` (grains, random scenes, one-grain variants, rendering), :mod:`.texts`
(captions, paraphrases, edit texts, target summaries, with their grain spans), :mod:`.build` (the
scenes, candidates and queries of each split, in memory) and :mod:`.generator` (the files, the
run's ensured set, ``python -m elva_jax.data.benchmarks.multigrain``).
"""
