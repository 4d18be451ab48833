"""The run configuration schema, the single source of every setting of every stage (each field named,
typed and documented; YAML presets in configs/). Stages read their section; pure functions that take
a smaller config (`SamplerConfig`, ...) get it from a section with `project`.

Values the paper or LamRA fix are defaults or preset values; values they leave open are named
fields with a stated default. A field whose change gives a checkpoint's step another meaning carries
``metadata["fingerprint"]`` (`elva_jax.runtime.fingerprint`).

One module per concern: `model` (model, mesh, optimizer; the `lora` section is `model.lora.LoraConfig`),
`data`, `stages` (stage list, warm start, run directory), `rl` (ELVA and Embed-RL), `eval`, the value
rules (`checks`) and the whole `RunConfig`.
"""

from elva_jax.schema.checks import RECIPES_WITHOUT_PLAN, check_plan_available, check_recipe_available, check_values
from elva_jax.schema.data import DataSection
from elva_jax.schema.eval import CACHE_POLICIES, EMBED_MODES, EvalSection
from elva_jax.schema.fields import field_value, project
from elva_jax.schema.model import MeshSection, ModelSection, OptimConfig
from elva_jax.schema.rl import EmbedRLSection, RLSection
from elva_jax.schema.run_config import RunConfig
from elva_jax.schema.stages import STAGES, RunSection, SFTSection, TrainSection

__all__ = [
    "CACHE_POLICIES",
    "EMBED_MODES",
    "RECIPES_WITHOUT_PLAN",
    "STAGES",
    "DataSection",
    "EmbedRLSection",
    "EvalSection",
    "MeshSection",
    "ModelSection",
    "OptimConfig",
    "RLSection",
    "RunConfig",
    "RunSection",
    "SFTSection",
    "TrainSection",
    "check_plan_available",
    "check_recipe_available",
    "check_values",
    "field_value",
    "project",
]
