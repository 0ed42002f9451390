"""Contrastive training and fine-tuning of CLIP models on image-text pairs."""
