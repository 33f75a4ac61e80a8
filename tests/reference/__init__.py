"""Plainly correct float64 loops written from the spec's equations; tests compare the models with them."""
