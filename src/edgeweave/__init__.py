"""edgeweave: fast, on-demand deep-learning inference on clusters of edge devices."""

__version__ = "0.1.0"
