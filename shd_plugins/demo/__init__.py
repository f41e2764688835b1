"""The embedded default: the scikit-learn digits demo."""
