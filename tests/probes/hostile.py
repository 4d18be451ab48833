"""Hostile-but-realistic probes through the real command lines, classified into a table.

    python tests/probes/hostile.py [--out DIR] [--only NAME,...]

Each probe gives a command a bad input (config, data, checkpoint, cache, tool input) or a risky one
(a signal, a corrupt step) and reads the outcome:
- clear:   the command stopped (exit != 0), its last stderr line naming the cause, no traceback;
- handled: the command was expected to go on (e.g. past a corrupt step) and did, saying so;
- silent wrong: it exited 0 where it should have refused, or went on without saying so;
- unclear crash: it stopped, but with a traceback or a message that does not name the cause;
- data lost: files that had to survive (earlier checkpoints, a user's folder) changed or vanished.
Not collected by pytest (the suite has a test per probe class); this runs every probe once, in a few
minutes, and prints the table of outcomes (docs/reliability.md). Exit status 1 when any probe is silent wrong, an
unclear crash or lost data.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
TRAIN = [sys.executable, "-m", "elva_jax.train"]
EVAL = [sys.executable, "-m", "elva_jax.eval"]
COMPARE = [sys.executable, "-m", "elva_jax.compare"]
GEN = [sys.executable, "-m", "elva_jax.data.benchmarks.multigrain"]
SHORT = ["train.stages=[contrastive]", "train.eval_modes=[]", "train.max_steps=2", "run.async_checkpoint=false"]


@dataclasses.dataclass
class Probe:
    name: str
    group: str
    argv: Callable[[Path], list[str]]  # workspace -> command line
    expect: str  # "error": stop naming `keyword`; "ok": exit 0 saying `keyword`
    keyword: str
    setup: Callable[[Path, dict], None] = lambda ws, base: None
    keep: Callable[[Path], list[Path]] = lambda ws: []  # files/folders that must survive unchanged


def _digest(paths: list[Path]) -> dict[str, str]:
    out = {}
    for p in paths:
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file()) if p.exists() else []
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
        if not files:
            out[str(p)] = "absent"
    return out


def _copy_run(ws: Path, base: dict) -> None:
    shutil.copytree(base["run"], ws / "run")


def _copy_data(ws: Path, base: dict) -> None:
    shutil.copytree(base["data"], ws / "data")


def _edit_first_query(ws: Path, fn) -> None:
    path = ws / "data" / "query" / "train" / "mbeir_multigrain_union_train.jsonl"
    lines = path.read_text().splitlines()
    lines[0] = fn(lines[0])
    path.write_text("\n".join(lines) + "\n")


def _bad_byte(ws: Path) -> None:
    path = ws / "data" / "query" / "train" / "mbeir_multigrain_union_train.jsonl"
    raw = path.read_bytes()
    at = raw.index(b"two")
    path.write_bytes(raw[:at] + b"\xff" + raw[at + 1 :])


def _flip_newest_chunk(ws: Path) -> None:
    step = max(int(s) for s in os.listdir(ws / "run" / "checkpoints") if s.isdigit())
    files = [f for f in (ws / "run" / "checkpoints" / str(step) / "state").rglob("*") if f.is_file()]
    victim = max(files, key=lambda f: f.stat().st_size)
    b = bytearray(victim.read_bytes())
    b[len(b) // 2] ^= 0x40
    victim.write_bytes(bytes(b))


def _corrupt_all(ws: Path) -> None:
    for step in os.listdir(ws / "run" / "checkpoints"):
        if step.isdigit():
            for f in (ws / "run" / "checkpoints" / step / "state").rglob("*"):
                if f.is_file() and f.stat().st_size > 64:
                    f.write_bytes(b"\0" * f.stat().st_size)


def _ckpts(ws: Path) -> list[Path]:
    return [ws / "run" / "checkpoints"]


def _good_steps(ws: Path) -> list[Path]:
    steps = sorted(int(s) for s in os.listdir(ws / "run" / "checkpoints") if s.isdigit())
    return [ws / "run" / "checkpoints" / str(s) for s in steps[:-1]]


def _write(ws: Path, name: str, data: bytes) -> None:
    (ws / name).write_bytes(data)


def probes() -> list[Probe]:
    run = lambda ws: [f"run.dir={ws / 'run'}"]  # noqa: E731
    data = lambda ws: ["data.kind=bundled", f"data.root={ws / 'data'}"]  # noqa: E731
    # the data the base run trained on (a resume probe changes one thing only)
    base_data = lambda ws: ["data.kind=bundled", f"data.root={ws.parent / 'base_data'}"]  # noqa: E731
    p: list[Probe] = []
    # --- configs that cannot be right: refused before anything starts
    for over, field in [
        ("optim.lr=-1", "optim.lr"),
        ("optim.lr=nan", "optim.lr"),
        ("train.tau=0", "train.tau"),
        ("rl.temperature=0", "rl.temperature"),
        ("rl.temperature=-1", "rl.temperature"),
        ("train.micro_batches=0", "train.micro_batches"),
        ("train.global_batch=0", "train.global_batch"),
        ("run.checkpoint_every=0", "run.checkpoint_every"),
        ("data.seq_buckets=[]", "data.seq_buckets"),
        ("train.max_steps=-1", "train.max_steps"),
        ("trian.max_steps=3", "train"),
        ("train.max_step=3", "max_steps"),
        ("train.global_batch=400", "train.global_batch"),
        ("train.global_batch=6", "train.global_batch"),  # 6 does not divide into micro_batches=4
        ("mesh.fsdp=3", "mesh"),
        ("rl.group_size=0", "rl.group_size"),
        ("data.max_skip_fraction=2", "data.max_skip_fraction"),
    ]:
        extra = ["train.micro_batches=4"] if over == "train.global_batch=6" else []
        p.append(
            Probe(
                f"config {over}",
                "config",
                lambda ws, o=over, e=extra: [*TRAIN, *run(ws), *data(ws), *SHORT, *e, o],
                "error",
                field,
                _copy_data,
            )
        )
    # --- bad data names its record
    p += [
        Probe(
            "non-UTF-8 byte in a training jsonl",
            "data",
            lambda ws: [*TRAIN, *run(ws), *data(ws), *SHORT],
            "error",
            "mbeir_multigrain_union_train.jsonl",
            lambda ws, b: (_copy_data(ws, b), _bad_byte(ws)),
        ),
        Probe(
            "malformed JSON line",
            "data",
            lambda ws: [*TRAIN, *run(ws), *data(ws), *SHORT],
            "error",
            "line 1",
            lambda ws, b: (_copy_data(ws, b), _edit_first_query(ws, lambda s: s[:-5])),
        ),
        Probe(
            "positive missing from the pool (fail policy)",
            "data",
            lambda ws: [*TRAIN, *run(ws), *data(ws), *SHORT],
            "error",
            "not in the pool",
            lambda ws, b: (
                _copy_data(ws, b),
                _edit_first_query(ws, lambda s: json.dumps({**json.loads(s), "pos_cand_list": ["10:999999"]})),
            ),
        ),
        Probe(
            "positive missing from the pool (skip policy)",
            "data",
            lambda ws: [*TRAIN, *run(ws), *data(ws), *SHORT, "data.image_policy=skip", "data.max_skip_fraction=0.05"],
            "ok",
            "left out 1 of",
            lambda ws, b: (
                _copy_data(ws, b),
                _edit_first_query(ws, lambda s: json.dumps({**json.loads(s), "pos_cand_list": ["10:999999"]})),
            ),
        ),
        Probe(
            "missing image files (fail policy)",
            "data",
            lambda ws: [*TRAIN, *run(ws), *data(ws), *SHORT],
            "error",
            "image",
            lambda ws, b: (_copy_data(ws, b), _remove_the_images(ws)),
        ),
        Probe(
            "an image larger than a patch row",
            "data",
            lambda ws: [*TRAIN, *run(ws), *data(ws), *SHORT, "data.patch_row_len=8", "data.min_pixels=3136"],
            "error",
            "patch",
            _copy_data,
        ),
        Probe(
            "data.root missing (kind mbeir)",
            "data",
            lambda ws: [
                *TRAIN,
                *run(ws),
                f"data.root={ws / 'nowhere'}",
                "data.train_files=[a.jsonl]",
                "data.pool_file=p.jsonl",
                *SHORT,
            ],
            "error",
            "nowhere",
        ),
        Probe(
            "bundled data.root is a foreign non-empty folder",
            "data",
            lambda ws: [*TRAIN, *run(ws), "data.kind=bundled", f"data.root={ws / 'mine'}", *SHORT],
            "error",
            "mine",
            lambda ws, b: ((ws / "mine").mkdir(), _write(ws / "mine", "notes.txt", b"my notes")),
            lambda ws: [ws / "mine"],
        ),
        Probe(
            "generator --overwrite on a foreign folder",
            "data",
            lambda ws: [*GEN, "--out", str(ws / "mine"), "--overwrite"],
            "error",
            "mine",
            lambda ws, b: (
                (ws / "mine" / "query").mkdir(parents=True),
                _write(ws / "mine" / "query", "keep.txt", b"x"),
            ),
            lambda ws: [ws / "mine"],
        ),
    ]
    # --- checkpoints: a resume never destroys one
    p += [
        Probe(
            "resume with lora.rank changed",
            "checkpoint",
            lambda ws: [*TRAIN, *run(ws), *base_data(ws), *SHORT, "train.max_steps=3", "lora.rank=8"],
            "error",
            "lora.rank",
            _copy_run,
            _ckpts,
        ),
        Probe(
            "resume with train.global_batch changed",
            "checkpoint",
            lambda ws: [*TRAIN, *run(ws), *base_data(ws), *SHORT, "train.max_steps=3", "train.global_batch=4"],
            "error",
            "train.global_batch",
            _copy_run,
            _ckpts,
        ),
        Probe(
            "resume with another model size",
            "checkpoint",
            lambda ws: [*TRAIN, *run(ws), *base_data(ws), *SHORT, "model.random_preset=tiny_qwen3_vl"],
            "error",
            "model",
            _copy_run,
            _ckpts,
        ),
        Probe(
            "run.resume=false over existing checkpoints",
            "checkpoint",
            lambda ws: [*TRAIN, *run(ws), *base_data(ws), *SHORT, "run.resume=false"],
            "error",
            "run.resume",
            _copy_run,
            _ckpts,
        ),
        Probe(
            "a flipped byte in the newest step",
            "checkpoint",
            # the run redoes step 2 from step 1, which must survive (a longer run rotates it out as usual
            # once newer verified steps exist: run.keep_checkpoints)
            lambda ws: [*TRAIN, *run(ws), *base_data(ws), *SHORT],
            "ok",
            "trying an earlier step",
            lambda ws, b: (_copy_run(ws, b), _flip_newest_chunk(ws)),
            _good_steps,
        ),
        Probe(
            "every step unreadable",
            "checkpoint",
            lambda ws: [*TRAIN, *run(ws), *base_data(ws), *SHORT, "train.max_steps=3"],
            "error",
            "no readable checkpoint",
            lambda ws, b: (_copy_run(ws, b), _corrupt_all(ws)),
            _ckpts,
        ),
    ]
    # --- eval, caches and tools check what they are given
    p += [
        Probe(
            "eval of a missing checkpoint",
            "tools",
            lambda ws: [*EVAL, "--checkpoint", str(ws / "none"), "--out", str(ws / "ev")],
            "error",
            "none",
        ),
        Probe(
            "compare with a missing --hf-dir",
            "tools",
            lambda ws: [*COMPARE, "--hf-dir", str(ws / "none")],
            "error",
            "none",
        ),
        Probe(
            "compare --inputs that is not an npz",
            "tools",
            lambda ws: [*COMPARE, "--hf-dir", str(ws / "tiny"), "--inputs", str(ws / "x.npz")],
            "error",
            "x.npz",
            lambda ws, b: (_write(ws, "x.npz", b"not a zip"), _tiny(ws)),
        ),
        Probe(
            "compare --inputs with float ids",
            "tools",
            lambda ws: [*COMPARE, "--hf-dir", str(ws / "tiny"), "--inputs", str(ws / "x.npz")],
            "error",
            "input_ids",
            lambda ws, b: (_npz(ws, input_ids=[[1.5, 2.0]], attention_mask=[[1, 1]]), _tiny(ws)),
        ),
        Probe(
            "compare --inputs with out-of-vocabulary ids",
            "tools",
            lambda ws: [*COMPARE, "--hf-dir", str(ws / "tiny"), "--inputs", str(ws / "x.npz")],
            "error",
            "vocab",
            lambda ws, b: (_npz(ws, input_ids=[[1, 10**8]], attention_mask=[[1, 1]]), _tiny(ws)),
        ),
        Probe(
            "compare --inputs with an empty batch",
            "tools",
            lambda ws: [*COMPARE, "--hf-dir", str(ws / "tiny"), "--inputs", str(ws / "x.npz")],
            "error",
            "empty",
            lambda ws, b: (
                _npz(ws, input_ids=np.zeros((0, 4), np.int32), attention_mask=np.zeros((0, 4), np.int32)),
                _tiny(ws),
            ),
        ),
    ]
    return p


def _nowhere(ws: Path) -> list[str]:
    return [f"data.root={ws / 'nowhere'}", "data.train_files=[a.jsonl]", "data.pool_file=p.jsonl"]


def _foreign_query_folder(ws: Path, base: dict) -> None:
    (ws / "mine" / "query").mkdir(parents=True)
    _write(ws / "mine" / "query", "keep.txt", b"x")


def _remove_the_images(ws: Path) -> None:
    """Every training image goes (the pipeline reads images as batches need them, so one missing image
    would only show when its record's batch comes)."""
    shutil.rmtree(ws / "data" / "images" / "multigrain" / "train")


def _npz(ws: Path, **arrays) -> None:
    np.savez(ws / "x.npz", **{k: np.asarray(v) for k, v in arrays.items()})


def _tiny(ws: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "elva_jax.model.tiny", "--preset", "tiny", "--out", str(ws / "tiny")],
        check=True,
        capture_output=True,
    )


def classify(pr: Probe, rc: int, out: str, err: str, lost: list[str]) -> str:
    if lost:
        return "data lost"
    if pr.expect == "ok":
        if rc == 0 and pr.keyword in out + err:
            return "handled"
        return "silent wrong" if rc == 0 else "unclear crash"
    if rc == 0:
        return "silent wrong"
    # the command ends in one line naming the cause (warnings logged on the way, e.g. a step found
    # corrupt, may come before it); a traceback anywhere is an unclear crash
    lines = [x for x in err.strip().splitlines() if x.strip()]
    if "Traceback" in err or not lines or pr.keyword.lower() not in lines[-1].lower():
        return "unclear crash"
    return "clear"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="", help="work folder (default: a temp dir)")
    ap.add_argument("--only", default="", help="comma-separated substrings of probe names")
    a = ap.parse_args(argv)
    work = Path(a.out or tempfile.mkdtemp(prefix="elva_probes_"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("ELVA_DEBUG", None)
    base = {"data": work / "base_data", "run": work / "base_run"}
    if not base["data"].exists():
        subprocess.run([*GEN, "--out", str(base["data"])], check=True, env=env, cwd=ROOT, capture_output=True)
    if not (base["run"] / "checkpoints").exists():
        cmd = [*TRAIN, f"run.dir={base['run']}", "data.kind=bundled", f"data.root={base['data']}", *SHORT]
        subprocess.run([*cmd, "run.checkpoint_every=1"], check=True, env=env, cwd=ROOT, capture_output=True)
    rows = []
    only = [s for s in a.only.split(",") if s]
    for i, pr in enumerate(probes()):
        if only and not any(s in pr.name for s in only):
            continue
        ws = work / f"p{i:02d}"
        shutil.rmtree(ws, ignore_errors=True)
        ws.mkdir()
        pr.setup(ws, base)
        before = _digest(pr.keep(ws))
        proc = subprocess.run(pr.argv(ws), env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
        after = _digest([Path(k) for k in before]) if before else {}
        lost = [k for k, v in before.items() if after.get(k) != v]
        verdict = classify(pr, proc.returncode, proc.stdout, proc.stderr, lost)
        first = (proc.stderr.strip().splitlines() or [""])[-1][:160]
        rows.append((pr.group, pr.name, verdict, proc.returncode, first))
        print(f"{verdict:14s} {pr.group:10s} {pr.name} (exit {proc.returncode}): {first}", flush=True)
    kinds = ["clear", "handled", "silent wrong", "unclear crash", "data lost"]
    print("\n| probes | " + " | ".join(kinds) + " |\n|---|" + "---|" * len(kinds))
    print(f"| {len(rows)} | " + " | ".join(str(sum(r[2] == k for r in rows)) for k in kinds) + " |")
    print("\n| group | probe | outcome | exit | last stderr line |\n|---|---|---|---|---|")
    for g, n, v, rc, first in rows:
        print(f"| {g} | {n} | {v} | {rc} | {first.replace('|', '/')} |")
    return int(any(r[2] in ("silent wrong", "unclear crash", "data lost") for r in rows))


if __name__ == "__main__":
    raise SystemExit(main())
