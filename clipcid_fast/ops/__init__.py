"""One file per op: Triton kernels → launchers → torch.library registration → backend dispatch."""
