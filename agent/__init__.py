"""Runtime on line hardware. Never imports torch, trainer or deploy."""
