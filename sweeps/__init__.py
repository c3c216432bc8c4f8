"""The shipped sweep files (`*.toml`), installed as the package `uspsjax.sweeps` (see
pyproject.toml) so that `uspsjax.sweep` finds them wherever uspsjax is installed."""
