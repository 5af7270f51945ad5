"""Grow convolutional image classifiers on cheap CPU nodes with Ray.

See docs/design.md for how the parts fit together.
"""

__version__ = "0.1.0"
