"""adafocus-deploy: fast adaptive inference for AdaFocusV3 video-recognition networks."""

from adafocus.errors import AdaFocusError

__version__ = "0.1.0"
__all__ = ["AdaFocusError", "__version__"]
