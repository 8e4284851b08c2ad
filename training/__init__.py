"""Training pipeline for the fer-edge emotion model (TensorFlow; never imported by the daemon)."""
