from .multi import read_multi, read_multi_naive
from .naive import read_backward_naive, read_naive
from .op import read

__all__ = ["read", "read_naive", "read_backward_naive", "read_multi", "read_multi_naive"]
