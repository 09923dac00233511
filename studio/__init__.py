"""Pruning Studio: analyse, structurally prune, recover, measure and export fine-tuned Vision Transformers.

The engine never imports Streamlit; ``studio.ui`` is the only subpackage that does.
"""

__version__ = "0.1.0"
