"""I/O: atomic writes and publishing, safetensors checkpoint files, the version stamp."""
