"""Runtime: kernel cache on disk, loader, dispatch and the knobs that steer them."""
from runtime.interpret import ensure_mode

ensure_mode()
