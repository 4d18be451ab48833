"""MMEB video tasks -> :class:`~elva_jax.data.benchmarks.mmeb.tasks.MMEBTask`, per VLM2Vec's V2 loaders.

``video_classification`` (``video_id``, ``pos_text``; global over the label list), ``ssv2``
(``video_id``, ``pos_text``, ``neg_text``; local over the row's labels), text -> video retrieval over
all videos (:data:`VIDEO_RET`: ``msrvtt``, ``msvd``, ``didemo``, ``vatex``, ``youcook2``), ``videomme``
(``question``, ``videoID``, ``options``, ``answer``; local over the options, label
``options["ABCD...".index(answer)]``), ``nextqa`` / ``egoschema`` / ``activitynetqa`` (local over the
options, see ``_video_qa_rows``), ``mvbench`` (20 subsets, local over each row's options; see
:data:`~elva_jax.data.benchmarks.mmeb.tasks.MVBENCH_SUBSETS`), and the moment-retrieval tasks
``moment_retrieval`` (QVHighlight, Charades-STA) and ``momentseeker`` (local over each query's clips; see
``_moment_rows``). Video paths are relative to ``video-tasks/{Task}/``.
"""

from __future__ import annotations

from pathlib import Path

from elva_jax.data.benchmarks.mmeb.hf import column, nonempty, video_dataset
from elva_jax.data.benchmarks.mmeb.tasks import MVBENCH_SUBSETS, MMEBDataError, MMEBTask, Side
from elva_jax.data.media.video import natural_key

__all__ = ["VIDEO_PARSERS", "VIDEO_QA_INSTRUCTION", "VIDEO_RET", "video_task"]

VIDEO_RET_QUERY_INSTRUCTION = "Find a video that contains the following visual content:"
VIDEO_RET_CAND_INSTRUCTION = "Understand the content of the provided video."
VIDEO_QA_INSTRUCTION = (
    "Given a video and a question, select the most accurate answer from the provided candidates. "
    "Return only the exact text of your chosen answer. Question:"
)
#: VLM2Vec's video-classification query instructions (video_classification_utils.DATASET_INSTRUCTION)
VIDEO_CLS_INSTRUCTION = {
    "K700": "Recognize the category of the video content.",
    "UCF101": "What activities or sports are being performed by the person in the video?",
    "HMDB51": "What actions or objects interactions are the person in the video doing?",
    "Breakfast": "Recognize the breakfast type that the person is cooking in the video.",
}
OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


#: VLM2Vec's text -> video retrieval loaders: parser -> (id column, path column or None, caption column,
#: query instruction); a list caption keeps its first entry; the video file is ``{video_root}/`` + the
#: path column (didemo / youcook2: its base name) or ``{id}.mp4``; the candidate's name is the id (didemo:
#: the file's stem)
VIDEO_RET = {
    "msrvtt": ("video_id", "video", "caption", VIDEO_RET_QUERY_INSTRUCTION),
    "msvd": ("video_id", "video", "caption", "Find the video snippet that corresponds to the given summary:"),
    "didemo": (None, "video", "caption", "Find a video that includes the following described scenes:"),
    "vatex": ("videoID", None, "enCap", "Select a video that fits the description provided:"),
    "youcook2": (
        "id",
        "video_path",
        "sentence",
        "Find a video that demonstrates the following action while making a recipe:",
    ),
}
SSV2_INSTRUCTION = "What actions or object interactions are being performed by the person in the video?"
#: moment retrieval (VLM2Vec moment_retrieval_datasets / momentseeker_dataset)
MOMENT_QUERY_INSTRUCTION = "Find the clip that corresponds to the described scene in the given video:"
MOMENTSEEKER_INSTRUCTION = {
    "text": "Find the clip that corresponds to the given text:",
    "image": "Select the video clip that aligns with the given text and image:",
    "video": "Find the clip that corresponds to the given sentence and video segment:",
}
MOMENTSEEKER_CAND_INSTRUCTION = "Understand the content of the provided video clip."
#: clip files of a moment-retrieval video directory (frame folders are its subdirectories)
CLIP_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
VIDEO_PARSERS = (
    "video_classification",
    "ssv2",
    *VIDEO_RET,
    "videomme",
    "nextqa",
    "egoschema",
    "activitynetqa",
    "mvbench",
) + ("moment_retrieval", "momentseeker")


def video_task(spec: dict, root: Path) -> MMEBTask:
    name, parser = spec["name"], spec["parser"]
    d = root / "video" / name
    ds = video_dataset(name, parser, root)
    where = str(d)
    vroot = root / spec.get("video_root", f"video-tasks/{name}")
    queries, qids, relevant, local = [], [], [], []
    names: list[str] = []
    index: dict[str, int] = {}
    cands: list[Side] = []

    def cand(key: str, side: Side) -> int:
        if key not in index:
            index[key] = len(names)
            names.append(key)
            cands.append(side)
        return index[key]

    if parser == "video_classification":
        vids, labels = column(ds, "video_id", where), column(ds, "pos_text", where)
        inst = spec.get("query_instruction", VIDEO_CLS_INSTRUCTION.get(name))
        for v, lab in zip(vids, labels):
            queries.append(Side(video=str(vroot / f"{v}.mp4"), instruction=inst))
            qids.append(str(v))
            relevant.append({cand(lab, Side(text=lab)): 1.0})
        for lab in spec.get("labels") or []:  # the label corpus after the queries' labels, as VLM2Vec orders them
            cand(lab, Side(text=lab))
        local_out = None
    elif parser == "ssv2":  # local: each row's own label list (neg_text holds the positive too)
        vids, pos, negs = (column(ds, c, where) for c in ("video_id", "pos_text", "neg_text"))
        inst = spec.get("query_instruction", SSV2_INSTRUCTION)
        for i, (v, lab, row) in enumerate(zip(vids, pos, negs)):
            nonempty(row, where, i, "neg_text")
            if lab not in row:
                raise MMEBDataError(f"{where}, row {i}: pos_text {lab!r} is not among its neg_text labels")
            queries.append(Side(video=str(vroot / f"{v}.mp4"), instruction=inst))
            qids.append(f"{name}:{i}")
            local.append([cand(t, Side(text=t)) for t in row])
            relevant.append({index[lab]: 1.0})
        local_out = local
    elif parser in VIDEO_RET:
        id_col, path_col, cap_col, inst = VIDEO_RET[parser]
        n = len(ds)
        paths = column(ds, path_col, where) if path_col else [None] * n
        ids = column(ds, id_col, where) if id_col else [Path(str(p)).stem for p in paths]
        caps = column(ds, cap_col, where)
        for i, (v, p, cap) in enumerate(zip(ids, paths, caps)):
            if isinstance(cap, list):
                nonempty(cap, where, i, cap_col)
                cap = cap[0]
            if p is None:
                f = vroot / f"{v}.mp4"
            else:
                f = vroot / (Path(str(p)).name if parser in ("didemo", "youcook2") else str(p))
            j = cand(str(v), Side(video=str(f), instruction=VIDEO_RET_CAND_INSTRUCTION))
            queries.append(Side(text=cap, instruction=spec.get("query_instruction", inst)))
            qids.append(f"{name}:{i}")
            relevant.append({j: 1.0})
        local_out = None
    elif parser in ("nextqa", "egoschema", "activitynetqa"):
        _video_qa_rows(parser, name, ds, where, vroot, queries, qids, local, relevant, cand)
        local_out = local
    elif parser == "mvbench":
        _mvbench_rows(name, ds, where, vroot, queries, qids, local, relevant, cand)
        local_out = local
    elif parser in ("moment_retrieval", "momentseeker"):
        _moment_rows(parser, name, ds, where, vroot, queries, qids, local, relevant, cand)
        local_out = local
    else:  # videomme
        cols = {c: column(ds, c, where) for c in ("question", "videoID", "options", "answer")}
        for i in range(len(ds)):
            opts = cols["options"][i]
            nonempty(opts, where, i, "options")
            ans = cols["answer"][i]
            if not isinstance(ans, str) or len(ans) != 1 or OPTION_LETTERS.find(ans) not in range(len(opts)):
                raise MMEBDataError(f"{where}, row {i}: answer {ans!r} is not one of the {len(opts)} option letters")
            queries.append(
                Side(
                    text=cols["question"][i] + "\n" + "\n".join(opts),
                    video=str(vroot / f"{cols['videoID'][i]}.mp4"),
                    instruction=VIDEO_QA_INSTRUCTION,
                )
            )
            qids.append(f"{name}:{i}")
            # candidate text: the option without its "A. " prefix; name: the option as written
            idx = [cand(o, Side(text=o[o.find(". ") :].strip(". "))) for o in opts]
            local.append(idx)
            relevant.append({index[opts[OPTION_LETTERS.index(ans)]]: 1.0})
        local_out = local
    if not queries:
        raise MMEBDataError(f"{where}: no rows")
    return MMEBTask(name, "video", spec["meta_task"], parser, where, qids, queries, cands, names, relevant, local_out)


def _video_qa_rows(parser: str, name: str, ds, where: str, vroot: Path, queries, qids, local, relevant, cand) -> None:
    """Rows of VLM2Vec's nextqa / egoschema / activitynetqa loaders (local over each row's options; query =
    :data:`VIDEO_QA_INSTRUCTION` + the question with its options, as the loaders write it):

    - nextqa: ``video``, ``question``, ``answer`` (int), ``a0``..``a4``; text ``question + "\nOptions:\n(A)
      a0\n(B) a1..."``; candidates the option texts.
    - egoschema: ``video_idx``, ``question``, ``answer`` (int as str), ``option`` (["A. ...", ...]); text
      ``question + " ".join(option)``; candidate text the option without its "A. " prefix, name as written.
    - activitynetqa: ``video_name``, ``question``, ``answer`` ("yes" / "no"); file ``v_{video_name}.mp4``;
      text ``question + "? (A) yes; (B) no."``; candidates "yes", "no".
    """
    if parser == "nextqa":
        cols = {c: column(ds, c, where) for c in ("video", "question", "answer", "a0", "a1", "a2", "a3", "a4")}
    elif parser == "egoschema":
        cols = {c: column(ds, c, where) for c in ("video_idx", "question", "answer", "option")}
    else:
        cols = {c: column(ds, c, where) for c in ("video_name", "question", "answer")}
    for i in range(len(ds)):
        q, ans = cols["question"][i], cols["answer"][i]
        if parser == "nextqa":
            opts = [cols[f"a{k}"][i] for k in range(5)]
            text = q + "\nOptions:\n" + "\n".join(f"({OPTION_LETTERS[k]}) {o}" for k, o in enumerate(opts))
            names, texts, video = opts, opts, f"{cols['video'][i]}.mp4"
        elif parser == "egoschema":
            opts = cols["option"][i]
            nonempty(opts, where, i, "option")
            text = q + " ".join(opts)
            names, texts, video = opts, [o[o.find(". ") :].strip(". ") for o in opts], f"{cols['video_idx'][i]}.mp4"
        else:
            names = texts = ["yes", "no"]
            text, video = q + "? (A) yes; (B) no.", f"v_{cols['video_name'][i]}.mp4"
        try:
            k = names.index(ans) if parser == "activitynetqa" else int(ans)
            if not 0 <= k < len(names):
                raise ValueError
        except (ValueError, TypeError):
            raise MMEBDataError(
                f"{where}, row {i}: answer {ans!r} does not name one of the {len(names)} options"
            ) from None
        queries.append(Side(text=text, video=str(vroot / video), instruction=VIDEO_QA_INSTRUCTION))
        qids.append(f"{name}:{i}")
        idx = [cand(nm, Side(text=t)) for nm, t in zip(names, texts)]
        local.append(idx)
        relevant.append({idx[k]: 1.0})


def _mvbench_rows(name: str, ds, where: str, vroot: Path, queries, qids, local, relevant, cand) -> None:
    """VLM2Vec's mvbench loader: columns ``subset``, ``video``, ``question``, ``candidates`` (list), ``answer``
    (one of the candidates). Query: :data:`VIDEO_QA_INSTRUCTION` with text ``question + "\nOptions:\n(A)
    c0\n(B) c1..."`` (its ``qa_template``) and the video ``{video root}/{subset folder}/{video}``, a frame
    folder at the subset's rate for episodic_reasoning; candidates (text and name) the options as written
    there, ``"(A) c0"``, ...; local over the row's options, the answer's option relevant. The subsets'
    start / end bounds are not used (VLM2Vec's V2 loader samples the whole video too)."""
    cols = {c: column(ds, c, where) for c in ("subset", "video", "question", "candidates", "answer")}
    for i in range(len(ds)):
        sub, opts, ans = cols["subset"][i], cols["candidates"][i], cols["answer"][i]
        if sub not in MVBENCH_SUBSETS:
            raise MMEBDataError(
                f"{where}, row {i}: unknown MVBench subset {sub!r} (known: {', '.join(MVBENCH_SUBSETS)})"
            )
        nonempty(opts, where, i, "candidates")
        if ans not in opts:
            raise MMEBDataError(f"{where}, row {i}: answer {ans!r} is not one of its candidates {opts!r}")
        if len(opts) > len(OPTION_LETTERS):
            raise MMEBDataError(f"{where}, row {i}: {len(opts)} candidates, more than {len(OPTION_LETTERS)} letters")
        named = [f"({OPTION_LETTERS[k]}) {o}" for k, o in enumerate(opts)]
        folder, fps = MVBENCH_SUBSETS[sub]
        text = cols["question"][i] + "\nOptions:\n" + "\n".join(named)
        video = str(vroot / folder / str(cols["video"][i]))
        queries.append(Side(text=text, video=video, instruction=VIDEO_QA_INSTRUCTION, video_fps=fps))
        qids.append(f"{name}:{i}")
        idx = [cand(o, Side(text=o)) for o in named]
        local.append(idx)
        relevant.append({idx[opts.index(ans)]: 1.0})


def _clip_entries(d: Path, where: str) -> dict[str, Path]:
    """stem -> path of each clip of a moment-retrieval video directory: its subdirectories (frame folders)
    and its video files (:data:`CLIP_EXTENSIONS`), other files ignored; a stem twice is an error."""
    if not d.is_dir():
        raise MMEBDataError(f"{where}: clip directory {d} not found")
    out: dict[str, Path] = {}
    for p in sorted(d.iterdir(), key=lambda x: natural_key(x.name)):
        if p.is_dir():
            stem = p.name
        elif p.suffix.lower() in CLIP_EXTENSIONS:
            stem = p.stem
        else:
            continue
        if stem in out:
            raise MMEBDataError(f"{where}: clip {stem!r} of {d} is both {out[stem].name} and {p.name}")
        out[stem] = p
    return out


def _moment_rows(parser: str, name: str, ds, where: str, vroot: Path, queries, qids, local, relevant, cand) -> None:
    """VLM2Vec's moment-retrieval loaders (local: each query ranks its own clips; hit@1 as every video task).

    - moment_retrieval (QVHighlight, Charades-STA): ``query``, ``video_path``. With ``v`` the stem of
      ``video_path``, ``{video root}/{v}/`` holds the clips, each a frame folder (subdirectory) or a clip
      file: ``query`` is the whole video (else the file ``{video root}/{basename(video_path)}``), the one
      clip whose name starts with ``positive`` is relevant, every other clip a negative. Query:
      :data:`MOMENT_QUERY_INSTRUCTION`, the text and the whole video; candidates: the clip with
      :data:`VIDEO_RET_CAND_INSTRUCTION`, named ``{v}/{clip}``; clips in natural name order (VLM2Vec
      takes ``os.listdir``'s order, which only matters for exact ties).
    - momentseeker: ``query``, ``positive_frames`` / ``negative_frames`` (lists of {``output_path``}),
      ``input_frames`` ("", an .mp4 or a .jpg). A clip at ``output_path`` is named ``output_path`` with
      "/" -> "_" and ".mp4" cut, read from the frame folder ``{video root}/video_frames/{name}`` when it
      exists, else the file ``{video root}/{output_path}``; every positive is relevant. Query (instruction
      by kind, :data:`MOMENTSEEKER_INSTRUCTION`): text only; text + image ``{video root}/query_{input}``;
      or text + video (named and found like a clip). Candidates: :data:`MOMENTSEEKER_CAND_INSTRUCTION`.

    Frame folders carry no frame rate: they are taken as already sampled (`elva_jax.data.media.video.load_video`).
    """
    if parser == "moment_retrieval":
        texts, vpaths = column(ds, "query", where), column(ds, "video_path", where)
        for i, (q, vp) in enumerate(zip(texts, vpaths)):
            v = Path(str(vp)).stem
            clips = _clip_entries(vroot / v, f"{where}, row {i}")
            qvideo = clips.pop("query", None) or vroot / Path(str(vp)).name
            pos = [k for k in clips if k.startswith("positive")]
            if len(pos) != 1 or len(clips) < 2:
                raise MMEBDataError(
                    f"{where}, row {i}: {vroot / v} needs exactly one 'positive*' clip and at least one other, "
                    f"has {sorted(clips)}"
                )
            queries.append(Side(text=q, video=str(qvideo), instruction=MOMENT_QUERY_INSTRUCTION))
            qids.append(f"{name}:{i}")
            idx = [
                cand(f"{v}/{k}", Side(video=str(p), instruction=VIDEO_RET_CAND_INSTRUCTION)) for k, p in clips.items()
            ]
            local.append(idx)
            relevant.append({idx[list(clips).index(pos[0])]: 1.0})
        return

    def clip(path: str) -> tuple[str, Path]:
        key = path.replace("/", "_").split(".mp4")[0]
        folder = vroot / "video_frames" / key
        return key, folder if folder.is_dir() else vroot / path

    cols = {c: column(ds, c, where) for c in ("query", "positive_frames", "negative_frames", "input_frames")}
    for i in range(len(ds)):
        q, inp = cols["query"][i], cols["input_frames"][i] or ""
        try:
            pos = [str(e["output_path"]) for e in cols["positive_frames"][i]]
            neg = [str(e["output_path"]) for e in cols["negative_frames"][i] or []]
        except (TypeError, KeyError):
            raise MMEBDataError(
                f"{where}, row {i}: positive_frames / negative_frames entries need 'output_path'"
            ) from None
        if not pos:
            raise MMEBDataError(f"{where}, row {i}: no positive clip")
        if inp.endswith(".mp4"):
            side = Side(text=q, video=str(clip(inp)[1]), instruction=MOMENTSEEKER_INSTRUCTION["video"])
        elif inp.endswith(".jpg"):
            side = Side(text=q, image=str(vroot / f"query_{inp}"), instruction=MOMENTSEEKER_INSTRUCTION["image"])
        else:
            side = Side(text=q, instruction=MOMENTSEEKER_INSTRUCTION["text"])
        queries.append(side)
        qids.append(f"{name}:{i}")
        idx = []
        for path in pos + neg:
            key, src = clip(path)
            idx.append(cand(key, Side(video=str(src), instruction=MOMENTSEEKER_CAND_INSTRUCTION)))
        local.append(idx)
        relevant.append(dict.fromkeys(idx[: len(pos)], 1.0))
