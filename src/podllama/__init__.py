"""podllama: build, run and serve llama.cpp servers in containers behind one gateway."""

__version__ = "0.1.0"
