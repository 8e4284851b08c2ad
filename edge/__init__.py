"""fer-edge: facial-emotion-recognition daemon for the edge (camera -> faces -> int8 CNN -> MQTT)."""

__version__ = "0.1.0"
