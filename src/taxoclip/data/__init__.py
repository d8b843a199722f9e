"""Data in: class metadata sources, captions, image checks, WebDataset shards, the image-feature cache."""
