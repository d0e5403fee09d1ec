"""optimum-mc: MC (Mixture Compressor) for Mixture-of-Experts LLMs, as a transformers quantizer."""

__version__ = "0.1.0"
