"""Evaluation: pure grounding metrics (metrics.py) and the confidence's (confidence.py), gRefCOCO's
scorer (grec.py), reading a view and scoring it (scoring.py), the text tables (tables.py), and the
FiftyOne evaluation run that the Model Evaluation panel shows (fiftyone_run.py)."""
