"""cryolive: live cryo-EM processing, from movies to 2D classes and 3D maps while data are collected."""

__version__ = "0.1.0"
