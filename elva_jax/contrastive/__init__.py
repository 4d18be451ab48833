"""The contrastive stage (stages 1-2, as LamRA): InfoNCE, the jitted step over a device mesh with exact
accumulation (`step`), the resumable loop (`loop`) and the stage as a run orders it (`stage`)."""
