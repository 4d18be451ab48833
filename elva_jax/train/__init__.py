"""Training: LoRA, optimizer, the contrastive step over a device mesh (and the CLI in __main__)."""
