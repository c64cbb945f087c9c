"""saliency-server: batched inference and saliency maps for timm image classifiers."""

__version__ = "0.1.0"
