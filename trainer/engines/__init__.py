"""TensorRT engines for a bundle: memory and cost of the graph, INT8 calibration, build, parity."""
