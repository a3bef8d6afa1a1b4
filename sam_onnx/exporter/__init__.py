"""The export job (``run.export``): weights, the PyTorch half and the check half, each in its
own process, then the graphs published atomically with a manifest."""
