"""The whole run configuration: one section per concern."""

from __future__ import annotations

import dataclasses

from elva_jax.model.lora import LoraConfig
from elva_jax.schema.checks import check_values
from elva_jax.schema.data import DataSection
from elva_jax.schema.eval import EMBED_MODES, EvalSection
from elva_jax.schema.model import MeshSection, ModelSection, OptimConfig
from elva_jax.schema.rl import EmbedRLSection, RLSection
from elva_jax.schema.stages import STAGES, RunSection, SFTSection, TrainSection


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelSection = ModelSection()
    lora: LoraConfig = LoraConfig()
    mesh: MeshSection = MeshSection()
    optim: OptimConfig = OptimConfig()
    data: DataSection = DataSection()
    train: TrainSection = TrainSection()
    run: RunSection = RunSection()
    rl: RLSection = RLSection()
    sft: SFTSection = SFTSection()
    embed_rl: EmbedRLSection = EmbedRLSection()
    eval: EvalSection = EvalSection()

    def __post_init__(self):
        bad = [s for s in self.train.stages if s not in STAGES]
        if bad:
            raise ValueError(f"train.stages: unknown stage(s) {bad}; choose from {list(STAGES)}")
        order = [STAGES.index(s) for s in self.train.stages]
        if order != sorted(set(order)):
            raise ValueError(f"train.stages {list(self.train.stages)}: each stage once, in the order {list(STAGES)}")
        bad = [m for m in self.train.eval_modes if m not in EMBED_MODES]
        if bad:
            raise ValueError(f"train.eval_modes: unknown mode(s) {bad}; choose from {list(EMBED_MODES)}")
        check_values(self)
        r = self.rl
        if r.micro_instances and r.instances_per_step % r.micro_instances:
            raise ValueError(
                f"rl.micro_instances {r.micro_instances} does not divide rl.instances_per_step {r.instances_per_step}"
            )
