"""dist_ssl: distributed self-supervised pre-training of Vision Transformers."""
__version__ = "0.1.0"
