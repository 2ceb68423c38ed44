"""Label QA: find the annotations that are wrong.

``label_errors.compute_label_errors`` scores every sample of a view with the probability that its
annotation (phrase + box) is wrong and the most likely kind, from the predictions of models that
never trained on it (``folds.py``: image-disjoint folds, or a checkpoint's untouched samples). The
score combines what such a model knows (``signals.py``) in a small classifier fitted on errors
injected into a copy of the view's own annotations (``inject.py``, ``combine.py``), so no hand
labels are needed. ``review.py`` is the fix-it loop the App's panel drives: accept, or take the
model's box, and see how many flags were right.

This layer sits above ``engine`` (it trains the fold models) and ``inference`` (it reads boxes);
the App's operator and panel sit above it.
"""
