"""How grounding data looks in a FiftyOne dataset: the label every box carries and the sample
fields that the importers, training, inference and the App read and write."""

# The label of every ground-truth and predicted box (the phrase rides on each box as its
# "expression" attribute): one small vocabulary, so that FiftyOne's evaluation has one class.
DEFAULT_LABEL = "referent"

# The sample field with each sample's referring expression, wherever none is named.
DEFAULT_PROMPT_FIELD = "expression"

# Where typed phrases' boxes go: ground_phrase's field, search_phrase's field, the grounding
# panel's preview of the current sample (its "keep" button copies the box to GROUNDED_FIELD).
GROUNDED_FIELD = "grounded"
SEARCH_FIELD = "search"
PREVIEW_FIELD = "grounding_preview"

# The boolean sample field that marks an expression referring to nothing (gRefCOCO): its
# ground truth holds no box, and one-box training and evaluation skip it and count it.
NO_TARGET_FIELD = "no_target"

# What tells training that an image lacks a phrase's referent (absent.add_absent_pairs): the kind
# of object the phrase names (REFERENT_KIND_FIELD; else its referent's CATEGORY_FIELD, as the
# RefCOCO-family sources write) and every kind of object its image holds (IMAGE_KINDS_FIELD, a
# list; else the kinds of the image's own phrases). The synthetic set writes both.
CATEGORY_FIELD = "category"
REFERENT_KIND_FIELD = "referent_kind"
IMAGE_KINDS_FIELD = "image_kinds"
