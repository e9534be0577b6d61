"""vldistill: distill CLIP-style vision-language dual encoders into small, fast students."""

__version__ = "0.1.0"
