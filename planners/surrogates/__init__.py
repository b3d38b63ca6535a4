"""Surrogate models that learn from results as they stream in (issue 4 fills this in)."""
