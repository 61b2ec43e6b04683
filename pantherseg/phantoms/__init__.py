"""Synthetic PANTHER-like MRI phantoms with labels, for tests, demos and the demo model."""
