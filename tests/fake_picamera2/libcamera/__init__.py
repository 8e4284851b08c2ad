"""Test double for libcamera's Python binding: only Transform, as picamera2 configurations take it."""


class Transform:
    def __init__(self, hflip: int = 0, vflip: int = 0, transpose: int = 0):
        self.hflip, self.vflip, self.transpose = int(hflip), int(vflip), int(transpose)

    def __repr__(self) -> str:
        return f"<libcamera.Transform hflip={self.hflip} vflip={self.vflip} transpose={self.transpose}>"
