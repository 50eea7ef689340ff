"""Exports: the merged model (in memory or streamed shard by shard), verification, presets, model cards."""
