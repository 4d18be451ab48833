"""The MMEB-V2 tasks: the 78-task table (name -> modality, meta-task, parser), the hub ids of the local
HF-cache fallback, and the task model (:class:`Side`, :class:`MMEBTask`) every parser builds."""

from __future__ import annotations

import dataclasses

from elva_jax.errors import UserError

__all__ = ["HUB", "MMEB_V2_TASKS", "MVBENCH_HUB", "MVBENCH_SUBSETS", "MMEBDataError", "MMEBTask", "Side"]

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
