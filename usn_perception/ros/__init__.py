"""The ROS 2 front: everything in the package that imports rclpy lives here.

``node`` (the lifecycle node and its ``main``), ``conversions`` (Image/CompressedImage ↔
numpy), ``pointcloud`` (the ``~/keypoints`` PointCloud2 layout, packing and decoding),
``photometric`` (the θ box message) and ``diagnostics`` (a small diagnostics updater).
"""
