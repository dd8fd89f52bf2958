"""Engine process: frames from ring slots in, scores and anomaly maps out."""
