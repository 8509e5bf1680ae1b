from .naive import write_backward_naive, write_naive
from .op import write

__all__ = ["write", "write_naive", "write_backward_naive"]
