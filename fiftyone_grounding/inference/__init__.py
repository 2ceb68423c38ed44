"""A trained network on a view: ``GroundingModel`` (FiftyOne's model interface), post-processing,
the fast apply path, phrase search and one-image prediction. Nothing here imports training code."""
