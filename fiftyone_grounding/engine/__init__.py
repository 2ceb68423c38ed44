"""Training: ``fit`` (fit.py) as named steps over the run's splits (splits.py), loaders and feature
caches (loaders.py, caches.py), optimizer (optim.py), step/epoch loop (loop.py, metrics.py), run
folder and resume (state.py), calibration of ``best/`` (calibration.py), per-epoch report
(report.py) and the run's record on its dataset (record.py); ``TrainConfig`` in config.py."""
