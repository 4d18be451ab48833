"""Target summaries of the summary warm start (the ``sft`` stage): the sides of a training set that carry
a target text, read by index through a data source.

A query carries its targets in ``query_src_content["summary"]``, a pool candidate in
``src_content["summary"]`` (the content object, or its JSON text as M-BEIR stores it): one string, or a
list of alternative strings (one is drawn per use, so a summariser learns a distribution to sample
from). The bundled multi-grain set writes four per side (`elva_jax.data.benchmarks.multigrain.texts.summary_variants`).
A query's summary describes what it asks for (for an edit query, the edited scene), since its
``[RET]`` embedding must land near its positive's: the warm start takes (query, positive) pairs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from elva_jax.data.errors import RecordError
from elva_jax.data.rows import query_from_row

__all__ = ["SummaryRecords", "summary_targets"]


def summary_targets(src_content, where: str) -> list[str]:
    """The target summaries in a record's source content ([] when it has none); a malformed value is a
    RecordError naming ``where``."""
    if src_content is None:
        return []
    if isinstance(src_content, str):
        try:
            src_content = json.loads(src_content)
        except json.JSONDecodeError:
            return []  # free text (M-BEIR's own content): no summary
    if not isinstance(src_content, dict) or "summary" not in src_content:
        return []
    value = src_content["summary"]
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, str) and v.strip() for v in values):
        raise RecordError(f"{where}: 'summary' must be a non-empty string or a list of them, got {value!r}")
    return list(values)


class SummaryRecords(Sequence):
    """``{"id", "sides": [query, positive], "targets": [query's, positive's]}`` for every record of a
    :class:`~elva_jax.data.records.ContrastiveRecords` set whose query and positive both carry target
    summaries: the query side as the RL stage prompts it (instruction included), its positive candidate,
    and each one's alternatives. Sides are built when indexed (prepared sources carry the images' bytes)."""

    def __init__(self, base):
        self.base = base
        self.entries: list[int] = []  # record indices of base
        self.targets: list[tuple[list[str], list[str]]] = []
        self.records_seen = len(base)
        queries = base.queries
        for i, q_row in enumerate(base.query_rows):
            row, where = queries[q_row], queries.where(q_row)
            q = query_from_row(row, where, src_is_json=queries.src_is_json)
            tq = summary_targets(q.query_src_content, where)
            pos = base.cand_rows[i][0]
            tp = summary_targets(base.candidate(pos)[0].src_content, base.pool.where(pos)) if tq else []
            if tq and tp:
                self.entries.append(i)
                self.targets.append((tq, tp))

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict:
        rec = self.base[self.entries[i]]
        return {"id": rec["id"], "sides": [rec["query"], rec["cands"][0]], "targets": list(self.targets[i])}
