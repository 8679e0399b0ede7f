"""seglock server side: FastAPI service and the `seglock` command line."""

__version__ = "0.1.0"
