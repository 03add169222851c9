"""CollaFuse: collaborative diffusion split between a shared server and edge clients."""

__version__ = "0.1.0"
