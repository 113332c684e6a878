"""SRDE: Sparse Routed Delta Experts on a frozen causal language model.

The core holds mechanisms only (registries, hooks, recipes, the SRDE layer, the run loop);
every feature arrives as a plugin. Importing this package stays cheap: no torch, no transformers.
"""

__version__ = "0.1.0"
