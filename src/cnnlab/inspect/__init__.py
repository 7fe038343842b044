"""Looking at models and runs: pictures (and, later, summaries and the zoo table)."""

from cnnlab.inspect.visualize import plot_curves

__all__ = ["plot_curves"]
