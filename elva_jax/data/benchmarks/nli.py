"""Reader for the SimCSE NLI csv used in stage 1 (``sent0,sent1,hard_neg``; hard_neg optional)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from etils import epath

from elva_jax.data.errors import DataFormatError, utf8_lines

__all__ = ["read_nli_csv"]


def read_nli_csv(path: str | Path) -> list[tuple[str, str, str | None]]:
    """NLI csv -> [(sent0, sent1, hard_neg or None)] in file order.

    The header must name ``sent0`` and ``sent1``; ``hard_neg`` is optional (None when the column is
    absent or the cell is empty); other columns are ignored. A row with the wrong number of cells or an
    empty sent0/sent1 raises DataFormatError with the 1-based line where the row ends.
    """
    path = epath.Path(path)
    rows: list[tuple[str, str, str | None]] = []
    with path.open("rb") as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader, None)
            if header is None:
                raise DataFormatError(path, 1, "empty file (expected a header 'sent0,sent1[,hard_neg]')")
            names = [h.strip() for h in header]
            missing = [c for c in ("sent0", "sent1") if c not in names]
            if missing:
                raise DataFormatError(path, reader.line_num, f"header {names} lacks column(s) {missing}")
            i0, i1 = names.index("sent0"), names.index("sent1")
            ineg = names.index("hard_neg") if "hard_neg" in names else None
            for row in reader:
                if not row or not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(names):
                    raise DataFormatError(
                        path, reader.line_num, f"expected {len(names)} cells ({','.join(names)}), got {len(row)}"
                    )
                sent0, sent1 = row[i0].strip(), row[i1].strip()
                if not sent0 or not sent1:
                    raise DataFormatError(path, reader.line_num, "empty sent0 or sent1")
                hard_neg = (row[ineg].strip() or None) if ineg is not None else None
                rows.append((sent0, sent1, hard_neg))
        except csv.Error as e:
            raise DataFormatError(path, reader.line_num, f"malformed csv ({e})") from e
        except UnicodeDecodeError:  # the csv reader decodes lazily: find the line that is not UTF-8
            for _ in utf8_lines(path):
                pass
            raise
    return rows
