"""ament_python package definition (colcon-buildable, also pip-installable)."""

from pathlib import Path

from setuptools import find_packages, setup

PACKAGE = 'usn_perception'
HERE = Path(__file__).resolve().parent


def tree(folder: str, patterns: tuple[str, ...] = ('*',)) -> list[tuple[str, list[str]]]:
    """(install dir, files) pairs that install ``folder`` under share/usn_perception/."""
    entries: dict[str, list[str]] = {}
    for pattern in patterns:
        for path in sorted((HERE / folder).rglob(pattern)):
            if path.is_file() and not path.name.startswith('.'):
                rel = path.relative_to(HERE)
                entries.setdefault(f'share/{PACKAGE}/{rel.parent}', []).append(str(rel))
    return sorted(entries.items())


setup(
    name=PACKAGE,
    version='0.1.0',
    packages=find_packages(exclude=['test', 'test.*', 'bench', 'bench.*']),
    data_files=[
        ('share/ament_index/resource_index/packages', [f'resource/{PACKAGE}']),
        (f'share/{PACKAGE}', ['package.xml']),
        *tree('launch', ('*.py',)),
        *tree('config', ('*.yaml', '*.xml')),
        *tree('models', ('*.json', '*.pt', '*.md')),
    ],
    install_requires=['setuptools'],
    zip_safe=True,
    maintainer='usn_perception maintainers',
    maintainer_email='maintainers@usn-perception.dev',
    description='Certified keypoint perception under brightness/contrast change.',
    license='Apache-2.0',
    tests_require=['pytest'],
    entry_points={
        'console_scripts': [
            'usn-perception = usn_perception.cli:main',
            'usn_perception_node = usn_perception.ros.node:main',
        ],
    },
)
