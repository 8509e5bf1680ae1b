from .naive import write_backward_naive, write_naive
from .op import write
from .residual import write_add, write_add_naive

__all__ = ["write", "write_naive", "write_backward_naive", "write_add", "write_add_naive"]
