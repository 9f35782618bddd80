"""resilient-moe: a serving runtime for Mixture-of-Experts models that keeps answering while its parts fail."""

__version__ = "0.1.0"
