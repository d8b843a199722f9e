"""The novelty scores' names, light (no torch) for the command line's choices (see `novelty`)."""

NOVELTY_SCORES = ("max-softmax", "energy", "mahalanobis", "relative-mahalanobis", "combined")
