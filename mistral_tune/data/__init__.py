"""Training data: sources and formats, SFT and preference rendering, packing, splits, the data report."""
