"""What is trained and served: the cross-encoder (loading, pair encoding, scoring), dynamic padding,
tiny in-code test models, and the adapters (LoRA, MTL-LoRA, per-market LoRA) with merge and export."""
