"""A FiftyOne view -> what a network reads: the field names, images and phrases, Detections <->
boxes, training records and items, augmentation, batches of whole images, the frozen-feature
caches, and the synthetic set. Nothing here knows of sources, training or inference."""
