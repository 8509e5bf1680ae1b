from .naive import route_naive
from .op import route

__all__ = ["route", "route_naive"]
