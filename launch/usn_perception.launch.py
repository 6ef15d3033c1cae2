"""Launch the certified keypoint node with the package's parameter file.

    ros2 launch usn_perception usn_perception.launch.py image:=/camera/image_raw

Arguments: ``image`` (input topic), ``model_path`` (empty = shipped default), ``namespace``,
``use_sim_time``, ``params_file``.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def generate_launch_description() -> LaunchDescription:
    """Declare the arguments and the node."""
    share = get_package_share_directory('usn_perception')
    default_params = os.path.join(share, 'config', 'usn_perception.yaml')
    return LaunchDescription([
        DeclareLaunchArgument('image', default_value='/camera/image_raw',
                              description='input sensor_msgs/Image topic'),
        DeclareLaunchArgument('model_path', default_value='',
                              description='model .json (empty: shipped default)'),
        DeclareLaunchArgument('namespace', default_value='',
                              description='namespace of the node (one per camera)'),
        DeclareLaunchArgument('use_sim_time', default_value='false',
                              description='use /clock (bag replay)'),
        DeclareLaunchArgument('params_file', default_value=default_params,
                              description='parameter YAML'),
        Node(
            package='usn_perception',
            executable='usn_perception_node',
            name='usn_perception',
            namespace=LaunchConfiguration('namespace'),
            output='screen',
            parameters=[
                LaunchConfiguration('params_file'),
                {'model_path': LaunchConfiguration('model_path'),
                 'use_sim_time': LaunchConfiguration('use_sim_time')},
            ],
            remappings=[('image', LaunchConfiguration('image'))],
        ),
    ])
