"""Patch embedding: model loading (the model-backend registry) and tile embedding into Parquet."""
