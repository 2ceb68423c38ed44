"""The grounding networks: the config and presets (config.py) and the frozen encoders' specs
(encoder_specs.py) and loading (encoders.py); written-out layers (layers.py); what every
architecture shares (base.py) and the three architectures: decoder.py, fusion.py with its one-box
and multi-box heads (refine_head.py, query_head.py), adapter.py; the factory (build.py); losses and
Hungarian matching (losses.py, matching.py); pure box functions (boxes.py); the confidence's
calibration (calibration.py); mixed precision (precision.py); checkpoints (checkpoint.py)."""
