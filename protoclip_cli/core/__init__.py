"""The numerical library: model, losses, k-means, PBT, optimisation. No CLI in here."""
