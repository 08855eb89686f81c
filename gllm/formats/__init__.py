"""File formats that several layers read (the GGUF container)."""
