# Source me (bash): the one place that sets the ROS 2 environment for tests, scripts and CI.
#  - DDS stays on loopback: discovery range LOCALHOST plus a Fast DDS profile whose only
#    transport is UDPv4 on `lo` (config/fastdds_loopback.xml); nothing leaves 127.0.0.1.
#  - A ROS domain of our own (tests override it per test).
#  - AMENT_PREFIX_PATH points at the virtual environment, so get_package_share_directory works
#    with a plain pip install.
_usn_root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export ROS_STATIC_PEERS=
export RMW_IMPLEMENTATION=rmw_fastrtps_cpp
export FASTDDS_DEFAULT_PROFILES_FILE="$_usn_root/config/fastdds_loopback.xml"
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-42}"
export USN_VENV="${USN_VENV:-$_usn_root/.venv}"
case ":${AMENT_PREFIX_PATH:-}:" in
  *":$USN_VENV:"*) ;;
  *) export AMENT_PREFIX_PATH="$USN_VENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}" ;;
esac
case ":$PATH:" in
  *":$USN_VENV/bin:"*) ;;
  *) export PATH="$USN_VENV/bin:$PATH" ;;
esac
unset _usn_root
