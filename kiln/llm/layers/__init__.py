"""Building blocks of kiln's model code; each layer knows how to load its share of a checkpoint tensor."""
