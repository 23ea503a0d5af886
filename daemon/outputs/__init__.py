"""Where events go: the ZeroMQ publisher."""
