"""Certified keypoint perception under brightness/contrast change.

The core (this package, without ``usn_perception.ros``) never imports rclpy.
"""

__version__ = '0.1.0'
