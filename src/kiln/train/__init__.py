"""Training: token data, the shared loop, checkpoints, pretraining (SFT / LoRA / DPO beside)."""
