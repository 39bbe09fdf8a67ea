"""The full-scale training pipeline: multi-stage WSD, the AdamW->Muon switch, distributed, resume."""
