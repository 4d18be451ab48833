"""Grain input pipelines with static shapes, image-failure policies and checkpointable iterators.

Modules: :mod:`.config` (knobs, image policy, counters), :mod:`.encode` (per-record encoding in Grain
workers: images, videos, the skip policy's substitutes), :mod:`.collate` (static-shape batches: sequence
buckets, patch packing) and :mod:`.iterator` (the Grain wiring, the resumable iterator, checkpoints).
Records come from :mod:`elva_jax.data.records`.

Training flow (``kind="contrastive"``, also NLI and RL records), elastic over the host count:
records (plain dicts) -> ``MapDataset.source`` -> seeded ``shuffle`` -> ``repeat`` -> encode (load
images and videos, tokenize; random access, so a record dropped by the skip policy is replaced by a substitute,
below) -> per-host slice ``[start + process_index :: process_count]`` -> ``to_iter_dataset`` ->
``batch`` (pad to a sequence bucket, pack images and videos into a fixed patch budget) -> optional
``mp_prefetch``.

A side is ``{"text", "image", "instruction"}`` plus optionally ``"video"`` (a video file or a frame
folder, local or an epath URL such as ``gs://``; a folder's frame rate is the side's ``"video_fps"``,
when it has one; prepared sources add ``"video_data"``: the file's bytes or the folder's frames'
bytes), decoded with :func:`elva_jax.data.media.video.load_video` at the config's video settings and the
model's geometry; a video over a patch row is resampled with fewer frames. A missing or undecodable
video, or one whose tokens overflow the largest sequence bucket, follows the image policy like a bad
image. Optional ``"extra_images"`` (local paths) follow the side's image, in order, each its own image
(the encoder's prompt must count them: `elva_jax.data.tcot.encoders`).

Global batch g holds the records at global indices [g*G, (g+1)*G), G = records per host batch x
process count; host h takes indices h, h+H, ... of it. The iterator's state is the global index of
the next batch (``{"global_next_index": ...}``), identical on every host, so a run saved on H hosts
resumes on any H' that divides the same global batch, each step seeing the same records. Grain's own
``ElasticIterator`` follows the same scheme but batches with a plain stack and rejects ``filter``;
this pipeline needs its collation and its skip policy, so it implements the scheme itself.

Skip policy under this scheme: a record whose image is missing or unreadable is replaced by the
record at index i + G (the same slot of the next global batch; then i + 2G, ...), so batches keep
their size, the set of records of a step depends on neither the host nor the host count, and the
substitute is seen twice in the epoch (never twice in one batch). Skips are counted and capped.

Corpus flow (``kind="corpus"``, evaluation): one host, no resume; records dropped by the skip policy
are filtered out (reported through the iterator's stats) rather than substituted.

Batches are numpy dicts in the layout of :func:`elva_jax.model.inputs.build_inputs` with a leading
micro-batch axis A: contrastive / NLI batches are ``{"query": inputs, "cand": inputs}`` whose cand rows
per micro-batch are the b positives then the b*k hard negatives (query order); RL batches are
``{"query": ..., "cand": ...}`` with b*(1+N) candidate rows; corpus batches are one ``inputs`` dict
without the A axis. Record ids of each batch are in ``iterator.last_ids``. All micro-batches of a
group share the smallest bucket fitting their longest row, so a run compiles at most
``len(seq_buckets)`` programs per group.

Instructions are chosen deterministically: prompt ``crc32(qid) % len(prompts)`` of the instruction
table entry for (dataset, query modality, candidate modality).
"""
