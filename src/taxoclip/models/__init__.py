"""Models: towers by name, LiT, losses, the model directory, and the registry that opens any kind."""
