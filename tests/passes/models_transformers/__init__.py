"""Tiny transformer model files (torchvision ViT, HF BERT / GPT-2) for capture and ``fxquant train``."""
