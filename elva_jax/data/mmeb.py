"""MMEB-V2 reader (VLM2Vec's benchmark): image, video and visual-document tasks from HF ``datasets``.

Each task becomes an :class:`MMEBTask`: query sides, a de-duplicated candidate list (a candidate is
identified by its *name*, as in VLM2Vec's eval: two entries with the same name are one candidate), and
per query either its own candidate list (``eval_type`` "local": the row's candidates, the positive
first) or the whole candidate list ("global"), plus the relevant candidates with their gains.

Columns, per VLM2Vec's V2 loaders (``src/data/eval_dataset/*``):

- image (``ziyjiang/MMEB_Test_Instruct``, one config per task, split test): ``qry_inst``, ``qry_text``,
  ``qry_img_path``, ``tgt_inst``, ``tgt_text`` (list), ``tgt_img_path`` (list); candidate 0 is the
  positive. Candidate names: the text (image_cls / image_qa / image_i2t), the image path (image_t2i),
  ``path + ":" + caption.strip('"')`` (image_i2i_vg). Image paths are relative to ``image-tasks/``.
- visual documents (BEIR triple ``queries`` / ``corpus`` / ``qrels``): ``query-id``, ``query``;
  ``corpus-id``, ``image``; ``query-id``, ``corpus-id``, ``score``. Qrels with score <= 0 are dropped,
  a repeated pair keeps its highest score (``load_qrels_mapping``); the corpus is ranked whole.
- video: ``video_classification`` (``video_id``, ``pos_text``; global over the label list), ``ssv2``
  (``video_id``, ``pos_text``, ``neg_text``; local over the row's labels), text -> video retrieval over
  all videos (:data:`VIDEO_RET`: ``msrvtt``, ``msvd``, ``didemo``, ``vatex``, ``youcook2``), ``videomme``
  (``question``, ``videoID``, ``options``, ``answer``; local over the options, label
  ``options["ABCD...".index(answer)]``), ``nextqa`` / ``egoschema`` / ``activitynetqa`` (local over the
  options, see ``_video_qa_rows``), ``mvbench`` (20 subsets, local over each row's options; see
  :data:`MVBENCH_SUBSETS`), and the moment-retrieval tasks ``moment_retrieval`` (QVHighlight,
  Charades-STA) and ``momentseeker`` (local over each query's clips; see ``_moment_rows``).

Directory layout (``root``; a task directory holds a ``save_to_disk`` dataset or ``*.parquet`` files)::

    image/{Task}/                         image tasks; image paths relative to image-tasks/
    image-tasks/...
    visdoc/{Task}/{queries,corpus,qrels}/ visual-document tasks (corpus images embedded or relative paths)
    video/{Task}/                         video tasks; video paths relative to video-tasks/{Task}/
    video/MVBench/{subset}/               MVBench: one dataset per subset, or one with a ``subset`` column
    video-tasks/{Task}/...                video files or frame folders (directories of images)
    mmeb_tasks.json                       optional: {"tasks": [{"name", "modality", "meta_task", "parser",
                                          "labels"?, "query_instruction"?}]}; default: the MMEB-V2 table

A task absent under ``root`` is read from the local HF cache (offline mode, never the hub) when its hub
id is known (:data:`HUB`); otherwise, or when the cache lacks it, :class:`MMEBDataError` names the path.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

from elva_jax.errors import UserError

__all__ = [
    "HUB",
    "MMEB_V2_TASKS",
    "MMEBDataError",
    "MMEBTask",
    "MVBENCH_SUBSETS",
    "SUPPORTED_PARSERS",
    "Side",
    "VISDOC_CAND_INSTRUCTION",
    "VISDOC_QUERY_INSTRUCTION",
    "load_dataset_dir",
    "load_task",
    "task_table",
    "video_dataset",
]

VISDOC_QUERY_INSTRUCTION = "Find a document image that matches the given query:"
VISDOC_CAND_INSTRUCTION = "Understand the content of the provided document image."
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

IMAGE_PARSERS = ("image_cls", "image_qa", "image_i2t", "image_t2i", "image_i2i_vg")
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
#: VLM2Vec's MVBench subsets (mvbench_dataset.subset_meta, in its order): subset -> (folder of its videos
#: under the task's video root, frame rate of a frame-folder subset or None for video files)
MVBENCH_SUBSETS: dict[str, tuple[str, float | None]] = {
    "episodic_reasoning": ("tvqa/frames_fps3_hq", 3.0),  # frame folders of 3 fps
    "action_sequence": ("star/Charades_v1_480", None),
    "action_prediction": ("star/Charades_v1_480", None),
    "action_antonym": ("ssv2_video", None),
    "fine_grained_action": ("Moments_in_Time_Raw/videos", None),
    "unexpected_action": ("FunQA_test/test", None),
    "object_existence": ("clevrer/video_validation", None),
    "object_interaction": ("star/Charades_v1_480", None),
    "object_shuffle": ("perception/videos", None),
    "moving_direction": ("clevrer/video_validation", None),
    "action_localization": ("sta/sta_video", None),
    "scene_transition": ("scene_qa/video", None),
    "action_count": ("perception/videos", None),
    "moving_count": ("clevrer/video_validation", None),
    "moving_attribute": ("clevrer/video_validation", None),
    "state_change": ("perception/videos", None),
    "fine_grained_pose": ("nturgbd", None),
    "character_order": ("perception/videos", None),
    "egocentric_navigation": ("vlnqa", None),
    "counterfactual_inference": ("clevrer/video_validation", None),
}
MVBENCH_HUB = ("VLM2Vec/MVBench", "train")  # one config per subset
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
VISDOC_PARSERS = ("vidore", "visrag")
SUPPORTED_PARSERS = IMAGE_PARSERS + VIDEO_PARSERS + VISDOC_PARSERS


class MMEBDataError(UserError, ValueError):
    """MMEB data that cannot be read or scored; the message names the path, task, row and column."""


def _table() -> dict[str, tuple[str, str, str]]:
    """name -> (modality, meta-task, parser) of the 78 MMEB-V2 tasks (VLM2Vec experiments/public/eval/*.yaml,
    modality lists of experiments/report_score_v2.py)."""
    t: dict[str, tuple[str, str, str]] = {}
    for (
        n
    ) in "ImageNet-1K N24News HatefulMemes VOC2007 SUN397 Place365 ImageNet-A ImageNet-R ObjectNet Country211".split():
        t[n] = ("image", "CLS", "image_cls")
    for n in "OK-VQA A-OKVQA DocVQA InfographicsVQA ChartQA Visual7W ScienceQA VizWiz GQA TextVQA".split():
        t[n] = ("image", "QA", "image_qa")
    for n in "MSCOCO_i2t VisualNews_i2t".split():
        t[n] = ("image", "RET", "image_i2t")
    for n in "VisDial MSCOCO_t2i VisualNews_t2i WebQA EDIS Wiki-SS-NQ".split():
        t[n] = ("image", "RET", "image_t2i")
    for n in "CIRR NIGHTS OVEN FashionIQ".split():
        t[n] = ("image", "RET", "image_i2i_vg")
    for n in "MSCOCO RefCOCO RefCOCO-Matching Visual7W-Pointing".split():
        t[n] = ("image", "VG", "image_i2i_vg")
    video = {
        "CLS": "K700 SmthSmthV2 HMDB51 UCF101 Breakfast",
        "QA": "MVBench Video-MME NExTQA EgoSchema ActivityNetQA",
        "RET": "DiDeMo MSR-VTT MSVD VATEX YouCook2",
        "MRET": "QVHighlight Charades-STA MomentSeeker",
    }
    parsers = {"HMDB51": "video_classification", "UCF101": "video_classification", "K700": "video_classification"}
    parsers |= {"Breakfast": "video_classification", "MSR-VTT": "msrvtt", "Video-MME": "videomme"}
    parsers |= {"SmthSmthV2": "ssv2", "QVHighlight": "moment_retrieval", "Charades-STA": "moment_retrieval"}
    for meta, names in video.items():
        for n in names.split():
            t[n] = ("video", meta, parsers.get(n, n.lower()))
    v1 = "arxivqa docvqa infovqa tabfquad tatdqa shiftproject syntheticDocQA_artificial_intelligence "
    v1 += "syntheticDocQA_energy syntheticDocQA_government_reports syntheticDocQA_healthcare_industry"
    for n in v1.split():
        t[f"ViDoRe_{n}"] = ("visdoc", "VDRv1", "vidore")
    v2 = "esg_reports_human_labeled_v2 biomedical_lectures_v2_multilingual economics_reports_v2_multilingual "
    for n in (v2 + "esg_reports_v2_multilingual").split():
        t[f"ViDoRe_{n}"] = ("visdoc", "VDRv2", "vidore")
    for n in "ArxivQA ChartQA MP-DocVQA SlideVQA InfoVQA PlotQA".split():
        t[f"VisRAG_{n}"] = ("visdoc", "VR", "visrag")
    for n in "ViDoSeek-page ViDoSeek-doc MMLongBench-page MMLongBench-doc".split():
        t[n] = ("visdoc", "OOD", "vidore")
    return t


#: name -> (modality, meta-task, parser) of the 78 MMEB-V2 tasks
MMEB_V2_TASKS: dict[str, tuple[str, str, str]] = _table()

#: hub ids (repo, config or language filter, split) for the local-HF-cache fallback of supported parsers
HUB: dict[str, tuple[str, str | None, str]] = {
    **{n: ("ziyjiang/MMEB_Test_Instruct", n, "test") for n, v in MMEB_V2_TASKS.items() if v[0] == "image"},
    "MSR-VTT": ("VLM2Vec/MSR-VTT", "test_1k", "test"),
    "HMDB51": ("VLM2Vec/HMDB51", None, "test"),
    "UCF101": ("VLM2Vec/UCF101", None, "test"),
    "Breakfast": ("VLM2Vec/Breakfast", None, "test"),
    "K700": ("VLM2Vec/Kinetics-700", None, "test"),
    "Video-MME": ("VLM2Vec/Video-MME", None, "test"),
    "MSVD": ("VLM2Vec/MSVD", None, "test"),
    "DiDeMo": ("VLM2Vec/DiDeMo", None, "test"),
    "VATEX": ("VLM2Vec/VATEX", None, "test"),
    "YouCook2": ("lmms-lab/YouCook2", None, "val"),
    "SmthSmthV2": ("VLM2Vec/SmthSmthV2", None, "test"),
    "NExTQA": ("VLM2Vec/NExTQA", "MC", "test"),
    "EgoSchema": ("VLM2Vec/EgoSchema", "Subset", "test"),
    "ActivityNetQA": ("VLM2Vec/ActivityNetQA", None, "test"),
    "QVHighlight": ("VLM2Vec/QVHighlight", None, "test"),
    "Charades-STA": ("VLM2Vec/Charades-STA", None, "test"),
    "MomentSeeker": ("VLM2Vec/MomentSeeker", None, "test"),
    "ViDoRe_arxivqa": ("vidore/arxivqa_test_subsampled_beir", None, "test"),
    "ViDoRe_docvqa": ("vidore/docvqa_test_subsampled_beir", None, "test"),
    "ViDoRe_infovqa": ("vidore/infovqa_test_subsampled_beir", None, "test"),
    "ViDoRe_tabfquad": ("vidore/tabfquad_test_subsampled_beir", None, "test"),
    "ViDoRe_tatdqa": ("vidore/tatdqa_test_beir", None, "test"),
    "ViDoRe_shiftproject": ("vidore/shiftproject_test_beir", None, "test"),
    **{
        f"ViDoRe_syntheticDocQA_{d}": (f"vidore/syntheticDocQA_{d}_test_beir", None, "test")
        for d in ("artificial_intelligence", "energy", "government_reports", "healthcare_industry")
    },
    "ViDoRe_esg_reports_human_labeled_v2": ("vidore/esg_reports_human_labeled_v2", None, "test"),
    "ViDoRe_biomedical_lectures_v2_multilingual": ("vidore/biomedical_lectures_v2", None, "test"),
    "ViDoRe_economics_reports_v2_multilingual": ("vidore/economics_reports_v2", None, "test"),
    "ViDoRe_esg_reports_v2_multilingual": ("vidore/esg_reports_v2", None, "test"),
}


@dataclasses.dataclass(frozen=True)
class Side:
    """One query or candidate: any of text, image path, video path (a file or a frame folder), its
    instruction, and the frame rate of a frame folder when the task knows it (``video_fps``)."""

    text: str | None = None
    image: str | None = None
    video: str | None = None
    instruction: str | None = None
    video_fps: float | None = None

    def item(self) -> dict:
        d = {"text": self.text, "image": self.image, "instruction": self.instruction}
        if self.video is not None:
            d["video"] = self.video
        if self.video_fps is not None:
            d["video_fps"] = self.video_fps
        return d


@dataclasses.dataclass
class MMEBTask:
    """One task ready to embed and score.

    candidates / cand_names: de-duplicated by name, first occurrence kept. ``local``: per query the
    candidate indices of its row in row order (duplicates kept, positive first); None for global tasks
    (every query ranks all candidates). ``relevant``: per query, candidate index -> gain (> 0).
    """

    name: str
    modality: str
    meta_task: str
    parser: str
    source: str
    query_ids: list[str]
    queries: list[Side]
    candidates: list[Side]
    cand_names: list[str]
    relevant: list[dict[int, float]]
    local: list[list[int]] | None = None

    @property
    def eval_type(self) -> str:
        return "global" if self.local is None else "local"

    @property
    def has_video(self) -> bool:
        return any(s.video for s in self.queries) or any(s.video for s in self.candidates)


def task_table(root: str | Path) -> list[dict]:
    """The tasks of ``root``: its ``mmeb_tasks.json`` manifest, else every MMEB-V2 task name found as
    ``{modality}/{name}`` under ``root`` (table order). Each: {"name", "modality", "meta_task", "parser", ...}."""
    root = Path(root)
    if not root.is_dir():
        raise MMEBDataError(f"MMEB data directory {root} not found")
    man = root / "mmeb_tasks.json"
    if man.is_file():
        try:
            tasks = json.loads(man.read_text(encoding="utf-8"))["tasks"]
        except (ValueError, KeyError, TypeError) as e:
            raise MMEBDataError(f"{man}: not a task manifest ({{'tasks': [...]}}): {e}") from None
        out = []
        for i, t in enumerate(tasks):
            miss = [k for k in ("name", "modality", "meta_task", "parser") if not isinstance(t, dict) or k not in t]
            if miss:
                raise MMEBDataError(f"{man}: task {i} lacks {miss}")
            out.append(dict(t))
        return out
    out = []
    for name, (mod, meta, parser) in MMEB_V2_TASKS.items():
        if (root / mod / name).is_dir():
            out.append({"name": name, "modality": mod, "meta_task": meta, "parser": parser})
    if not out:
        raise MMEBDataError(
            f"{root}: no MMEB task found (neither mmeb_tasks.json nor image/, video/, visdoc/ task directories)"
        )
    return out


# ----------------------------------------------------------------------------------------------------
# datasets


def _offline() -> None:
    """HF offline mode for this process: the environment variables, and the flags that huggingface_hub
    and datasets read from them at import (already imported modules would otherwise still go online)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    import datasets.config
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True


def load_dataset_dir(path: str | Path, split: str = "test"):
    """A ``datasets.Dataset`` from a ``save_to_disk`` directory (a DatasetDict gives ``split``, or its only
    split) or from the ``*.parquet`` files under ``path`` (sorted). Errors name the path."""
    _offline()
    import datasets

    datasets.disable_progress_bars()
    path = Path(path)
    if not path.is_dir():
        raise MMEBDataError(f"{path}: dataset directory not found")
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        try:
            ds = datasets.load_from_disk(str(path))
        except (OSError, ValueError, FileNotFoundError) as e:
            raise MMEBDataError(f"{path}: cannot read the saved dataset: {e}") from None
        if isinstance(ds, datasets.DatasetDict):
            if split in ds:
                return ds[split]
            if len(ds) == 1:
                return next(iter(ds.values()))
            raise MMEBDataError(f"{path}: DatasetDict without a {split!r} split (has {list(ds)})")
        return ds
    files = sorted(str(p) for p in path.rglob("*.parquet"))
    if not files:
        raise MMEBDataError(f"{path}: neither a save_to_disk dataset (state.json) nor *.parquet files")
    try:
        return datasets.load_dataset("parquet", data_files=files, split="train", keep_in_memory=True)
    except Exception as e:  # pyarrow / datasets raise many kinds on a bad file
        raise MMEBDataError(f"{path}: cannot read the parquet files: {e}") from None


def _from_cache(name: str, config: str | None, tried: Path):
    if name not in HUB:
        raise MMEBDataError(f"task {name}: {tried} not found (and no hub id known for the HF-cache fallback)")
    repo, sub, split = HUB[name]
    _offline()
    import datasets

    try:
        return datasets.load_dataset(repo, config if config is not None else sub, split=split)
    except Exception as e:  # offline: a missing cache entry raises ConnectionError / FileNotFoundError / ValueError
        raise MMEBDataError(
            f"task {name}: {tried} not found and {repo} ({config or sub}) is not in the local HF cache "
            f"(offline mode): {type(e).__name__}"
        ) from None


def _column(ds, col: str, where: str) -> list:
    if col not in ds.column_names:
        raise MMEBDataError(f"{where}: column {col!r} missing (has {ds.column_names})")
    return ds[col]


def _nonempty(v, where: str, row: int, col: str) -> None:
    if not isinstance(v, list) or not v:
        raise MMEBDataError(f"{where}, row {row}: {col!r} must be a non-empty list, got {v!r}")


# ----------------------------------------------------------------------------------------------------
# readers


def _clean_inst(s: str | None) -> str | None:
    s = (s or "").replace("<|image_1|>", "").strip()
    return s or None


def _image_task(spec: dict, root: Path) -> MMEBTask:
    name, parser = spec["name"], spec["parser"]
    d = root / "image" / name
    ds = load_dataset_dir(d) if d.is_dir() else _from_cache(name, None, d)
    where = str(d)
    img_root = root / spec.get("image_root", "image-tasks")
    cols = {c: _column(ds, c, where) for c in ("qry_inst", "qry_text", "qry_img_path", "tgt_text")}
    with_tgt_img = parser in ("image_t2i", "image_i2i_vg")
    if with_tgt_img:
        cols["tgt_inst"] = _column(ds, "tgt_inst", where)
        cols["tgt_img_path"] = _column(ds, "tgt_img_path", where)
    names: list[str] = []
    index: dict[str, int] = {}
    cands: list[Side] = []
    queries, qids, local, relevant = [], [], [], []
    for i in range(len(ds)):
        texts = cols["tgt_text"][i]
        _nonempty(texts, where, i, "tgt_text")
        qimg = cols["qry_img_path"][i] if parser != "image_t2i" else None  # t2i queries are text only in VLM2Vec
        queries.append(
            Side(
                text=cols["qry_text"][i] or None,
                image=str(img_root / qimg) if qimg else None,
                instruction=_clean_inst(cols["qry_inst"][i]),
            )
        )
        qids.append(f"{name}:{i}")
        if with_tgt_img:
            paths = cols["tgt_img_path"][i]
            _nonempty(paths, where, i, "tgt_img_path")
            if len(paths) != len(texts):
                raise MMEBDataError(f"{where}, row {i}: {len(texts)} tgt_text but {len(paths)} tgt_img_path")
            inst = _clean_inst(cols["tgt_inst"][i])
            row = []
            for p, t in zip(paths, texts):
                key = p if parser == "image_t2i" else f"{p}:{t.strip(chr(34))}"
                row.append(
                    (key, Side(text=t.strip() or None, image=str(img_root / p) if p else None, instruction=inst))
                )
        else:
            row = [(t, Side(text=t)) for t in texts]
        idx = []
        for key, side in row:
            if key not in index:
                index[key] = len(names)
                names.append(key)
                cands.append(side)
            idx.append(index[key])
        local.append(idx)
        relevant.append({idx[0]: 1.0})
    if not queries:
        raise MMEBDataError(f"{where}: no rows")
    return MMEBTask(name, "image", spec["meta_task"], parser, where, qids, queries, cands, names, relevant, local)


def _visdoc_task(spec: dict, root: Path, materialize_dir: Path | None) -> MMEBTask:
    import datasets

    name = spec["name"]
    d = root / "visdoc" / name
    parts = {}
    for p in ("queries", "corpus", "qrels"):
        parts[p] = load_dataset_dir(d / p) if d.is_dir() else _from_cache(name, p, d)
    q, c, r = parts["queries"], parts["corpus"], parts["qrels"]
    where = str(d)
    if "image" not in c.column_names:
        raise MMEBDataError(f"{where}/corpus: column 'image' missing (has {c.column_names})")
    c = c.cast_column("image", datasets.Image(decode=False))
    _column(c, "corpus-id", f"{where}/corpus")
    corpus: dict[str, Side] = {}
    for i, row in enumerate(c):  # row by row: the corpus images stay memory-mapped
        cid, im = str(row["corpus-id"]), row["image"]
        if cid in corpus:
            continue  # VLM2Vec keeps a corpus id's first row
        if im is None:
            raise MMEBDataError(f"{where}/corpus, row {i}: corpus-id {cid!r} has no image")
        if im.get("bytes"):
            if materialize_dir is None:
                raise MMEBDataError(f"{where}/corpus: embedded images need a directory to be written to")
            out = materialize_dir / name / f"{cid}.png"
            if not out.is_file():
                out.parent.mkdir(parents=True, exist_ok=True)
                tmp = out.with_suffix(f".{os.getpid()}.tmp")  # processes sharing the directory never collide
                tmp.write_bytes(im["bytes"])
                tmp.replace(out)
            path = str(out)
        elif im.get("path"):
            path = im["path"] if Path(im["path"]).is_absolute() else str(d / "corpus" / im["path"])
        else:
            raise MMEBDataError(f"{where}/corpus, row {i}: image of {cid!r} has neither bytes nor a path")
        corpus[cid] = Side(image=path, instruction=VISDOC_CAND_INSTRUCTION)
    qrels: dict[str, dict[str, float]] = {}
    rq = _column(r, "query-id", f"{where}/qrels")
    rc = _column(r, "corpus-id", f"{where}/qrels")
    rs = _column(r, "score", f"{where}/qrels")
    for i, (qid, cid, s) in enumerate(zip(rq, rc, rs)):
        if s > 0:
            m = qrels.setdefault(str(qid), {})
            m[str(cid)] = max(m.get(str(cid), 0.0), float(s))
            if str(cid) not in corpus:
                raise MMEBDataError(f"{where}/qrels, row {i}: corpus-id {cid!r} is not in the corpus")
    qcol = _column(q, "query-id", f"{where}/queries")
    texts = _column(q, "query", f"{where}/queries")
    for i, qid in enumerate(qcol):
        if str(qid) not in qrels:
            raise MMEBDataError(f"{where}/queries, row {i}: query-id {qid!r} has no qrels with score > 0")
    if not qcol:
        raise MMEBDataError(f"{where}/queries: no rows")
    # candidate order as VLM2Vec's generate_cand_dataset: each query's qrels documents, then the corpus
    names: list[str] = []
    index: dict[str, int] = {}
    for cid in [c for qid in qcol for c in qrels[str(qid)]] + list(corpus):
        if cid not in index:
            index[cid] = len(names)
            names.append(cid)
    cands = [corpus[n] for n in names]
    qids = [str(x) for x in qcol]
    queries = [Side(text=t, instruction=VISDOC_QUERY_INSTRUCTION) for t in texts]
    relevant = [{index[cid]: g for cid, g in qrels[qid].items()} for qid in qids]
    return MMEBTask(name, "visdoc", spec["meta_task"], spec["parser"], where, qids, queries, cands, names, relevant)


def video_dataset(name: str, parser: str, root: str | Path):
    """The rows of video task ``name``: the dataset directory ``video/{name}``, else the local HF cache.
    MVBench: the subset directories ``video/MVBench/{subset}`` present (in :data:`MVBENCH_SUBSETS` order)
    concatenated with a ``subset`` column, or one dataset that has that column; from the cache, every
    subset of :data:`MVBENCH_HUB` (as VLM2Vec's ``load_hf_dataset_multiple_subset``)."""
    d = Path(root) / "video" / name
    if parser != "mvbench":
        return load_dataset_dir(d) if d.is_dir() else _from_cache(name, None, d)
    import datasets

    if d.is_dir():
        subs = [x for x in MVBENCH_SUBSETS if (d / x).is_dir()]
        if not subs:
            ds = load_dataset_dir(d)
            if "subset" not in ds.column_names:
                raise MMEBDataError(
                    f"{d}: MVBench needs one directory per subset ({', '.join(MVBENCH_SUBSETS)}) or a 'subset' column"
                )
            return ds
        parts = [(x, load_dataset_dir(d / x)) for x in subs]
    else:
        _offline()
        repo, split = MVBENCH_HUB
        parts = []
        for x in MVBENCH_SUBSETS:
            try:
                parts.append((x, datasets.load_dataset(repo, x, split=split)))
            except Exception as e:  # offline: a missing cache entry raises several kinds
                raise MMEBDataError(
                    f"task {name}: {d} not found and {repo} ({x}) is not in the local HF cache (offline mode): "
                    f"{type(e).__name__}"
                ) from None
    parts = [p if "subset" in p.column_names else p.add_column("subset", [x] * len(p)) for x, p in parts]
    return datasets.concatenate_datasets(parts)


def _video_task(spec: dict, root: Path) -> MMEBTask:
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
        vids, labels = _column(ds, "video_id", where), _column(ds, "pos_text", where)
        inst = spec.get("query_instruction", VIDEO_CLS_INSTRUCTION.get(name))
        for v, lab in zip(vids, labels):
            queries.append(Side(video=str(vroot / f"{v}.mp4"), instruction=inst))
            qids.append(str(v))
            relevant.append({cand(lab, Side(text=lab)): 1.0})
        for lab in spec.get("labels") or []:  # the label corpus after the queries' labels, as VLM2Vec orders them
            cand(lab, Side(text=lab))
        local_out = None
    elif parser == "ssv2":  # local: each row's own label list (neg_text holds the positive too)
        vids, pos, negs = (_column(ds, c, where) for c in ("video_id", "pos_text", "neg_text"))
        inst = spec.get("query_instruction", SSV2_INSTRUCTION)
        for i, (v, lab, row) in enumerate(zip(vids, pos, negs)):
            _nonempty(row, where, i, "neg_text")
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
        paths = _column(ds, path_col, where) if path_col else [None] * n
        ids = _column(ds, id_col, where) if id_col else [Path(str(p)).stem for p in paths]
        caps = _column(ds, cap_col, where)
        for i, (v, p, cap) in enumerate(zip(ids, paths, caps)):
            if isinstance(cap, list):
                _nonempty(cap, where, i, cap_col)
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
        cols = {c: _column(ds, c, where) for c in ("question", "videoID", "options", "answer")}
        for i in range(len(ds)):
            opts = cols["options"][i]
            _nonempty(opts, where, i, "options")
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
        cols = {c: _column(ds, c, where) for c in ("video", "question", "answer", "a0", "a1", "a2", "a3", "a4")}
    elif parser == "egoschema":
        cols = {c: _column(ds, c, where) for c in ("video_idx", "question", "answer", "option")}
    else:
        cols = {c: _column(ds, c, where) for c in ("video_name", "question", "answer")}
    for i in range(len(ds)):
        q, ans = cols["question"][i], cols["answer"][i]
        if parser == "nextqa":
            opts = [cols[f"a{k}"][i] for k in range(5)]
            text = q + "\nOptions:\n" + "\n".join(f"({OPTION_LETTERS[k]}) {o}" for k, o in enumerate(opts))
            names, texts, video = opts, opts, f"{cols['video'][i]}.mp4"
        elif parser == "egoschema":
            opts = cols["option"][i]
            _nonempty(opts, where, i, "option")
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
    cols = {c: _column(ds, c, where) for c in ("subset", "video", "question", "candidates", "answer")}
    for i in range(len(ds)):
        sub, opts, ans = cols["subset"][i], cols["candidates"][i], cols["answer"][i]
        if sub not in MVBENCH_SUBSETS:
            raise MMEBDataError(
                f"{where}, row {i}: unknown MVBench subset {sub!r} (known: {', '.join(MVBENCH_SUBSETS)})"
            )
        _nonempty(opts, where, i, "candidates")
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
    from elva_jax.data.video import natural_key

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

    Frame folders carry no frame rate: they are taken as already sampled (`elva_jax.data.video.load_video`).
    """
    if parser == "moment_retrieval":
        texts, vpaths = _column(ds, "query", where), _column(ds, "video_path", where)
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

    cols = {c: _column(ds, c, where) for c in ("query", "positive_frames", "negative_frames", "input_frames")}
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


def load_task(spec: dict, root: str | Path, *, materialize_dir: str | Path | None = None) -> MMEBTask:
    """Read one task of :func:`task_table` under ``root``. ``materialize_dir``: where corpus images stored
    as bytes are written as ``{task}/{corpus-id}.png`` (VLM2Vec writes them under its image root)."""
    root = Path(root)
    p = spec["parser"]
    if p in IMAGE_PARSERS:
        return _image_task(spec, root)
    if p in VISDOC_PARSERS:
        return _visdoc_task(spec, root, Path(materialize_dir) if materialize_dir else None)
    if p in VIDEO_PARSERS:
        return _video_task(spec, root)
    raise MMEBDataError(
        f"task {spec['name']}: parser {p!r} is not supported (supported: "
        f"{', '.join(IMAGE_PARSERS + VIDEO_PARSERS + VISDOC_PARSERS)})"
    )


def select(tasks: Sequence[dict], names: Sequence[str]) -> list[dict]:
    """Keep the named tasks (all when empty); an unknown name is an error listing the known ones."""
    if not names:
        return list(tasks)
    known = [t["name"] for t in tasks]
    bad = [n for n in names if n not in known]
    if bad:
        raise MMEBDataError(f"unknown MMEB task(s) {bad}; this data has: {', '.join(known)}")
    return [t for t in tasks if t["name"] in set(names)]
