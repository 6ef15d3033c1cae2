"""Real evaluation frames: ViSP image sequences from Debian's ``visp-images-data`` package.

The frames are GPL-2 data and are never committed: they are fetched at run time with
``apt-get download`` (no install, no root needed for the download itself), and only the
requested sequence folder is unpacked from the .deb into a per-user cache.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from usn_perception.errors import DatasetError, UsnPerceptionError

PACKAGE = 'visp-images-data'
DATA_PREFIX = PurePosixPath('usr/share/visp-images-data/ViSP-images')
COPYRIGHT = PurePosixPath('usr/share/doc/visp-images-data/copyright')
MARKER = '.usn_perception_fetch.json'
FRAME_SUFFIXES = ('.pgm', '.ppm', '.pnm', '.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')

_SEQUENCE_RE = re.compile(r'[A-Za-z0-9][A-Za-z0-9._-]*')
_TIMEOUT_S = 900


class DataUnavailableError(UsnPerceptionError, RuntimeError):
    """External data cannot be obtained here (no network, no apt, unknown package/sequence)."""


def default_cache_dir() -> Path:
    """Return ``$XDG_CACHE_HOME/usn_perception/visp`` (default ``~/.cache/...``)."""
    base = os.environ.get('XDG_CACHE_HOME') or str(Path.home() / '.cache')
    return Path(base) / 'usn_perception' / 'visp'


def _read_marker(folder: Path) -> dict | None:
    try:
        marker = json.loads((folder / MARKER).read_text(encoding='utf-8'))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or not isinstance(marker.get('frames'), int):
        return None
    return marker


def cached_sequence(cache: Path | None = None, sequence: str = 'mire-2') -> Path | None:
    """Return the cached sequence folder if a complete fetch is there, else None (no I/O)."""
    folder = Path(cache if cache is not None else default_cache_dir()) / sequence
    marker = _read_marker(folder)
    if marker is None or len(list_frames(folder)) != marker['frames']:
        return None
    return folder


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=_TIMEOUT_S, check=False
        )
    except FileNotFoundError:
        raise DataUnavailableError(
            f'{cmd[0]} not found: fetching {PACKAGE} needs a Debian/Ubuntu system with apt'
        ) from None
    except subprocess.TimeoutExpired:
        raise DataUnavailableError(f'{" ".join(cmd)} timed out after {_TIMEOUT_S} s') from None


def _stderr_tail(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in (proc.stderr or '').splitlines() if ln.strip()]
    return ' | '.join(lines[-3:]) or f'exit status {proc.returncode}'


def _extract(deb: Path, sequence: str, dest: Path) -> int:
    """Stream the .deb's data tarball and unpack only ``ViSP-images/<sequence>/`` files.

    Equivalent to ``dpkg-deb --fsys-tarfile X.deb | tar -x <folder>``, with the member filter
    done here so that no path outside ``dest`` can ever be written.
    """
    prefix = DATA_PREFIX / sequence
    proc = subprocess.Popen(
        ['dpkg-deb', '--fsys-tarfile', str(deb)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    count = 0
    try:
        assert proc.stdout is not None
        with tarfile.open(fileobj=proc.stdout, mode='r|', bufsize=1 << 20) as tar:
            for member in tar:
                name = PurePosixPath(member.name.removeprefix('./'))
                if name == COPYRIGHT and member.isfile():
                    target = dest / 'copyright'
                elif member.isfile() and name.parent == prefix:
                    target = dest / name.name
                else:
                    continue
                src = tar.extractfile(member)
                assert src is not None
                with target.open('wb') as out:
                    shutil.copyfileobj(src, out)
                count += target.name != 'copyright'
    except tarfile.TarError as e:
        proc.kill()
        raise DataUnavailableError(f'{deb.name}: cannot read the data archive: {e}') from None
    finally:
        _, err = proc.communicate()
    if proc.returncode != 0:
        raise DataUnavailableError(
            f'dpkg-deb --fsys-tarfile {deb.name} failed: {err.decode(errors="replace").strip()}'
        )
    return count


def fetch_visp(cache: Path | None = None, sequence: str = 'mire-2') -> Path:
    """Return the folder of ``sequence`` frames, fetching ``visp-images-data`` if needed.

    Runs ``apt-get download visp-images-data`` in a temporary folder (it does not install the
    package), unpacks only ``ViSP-images/<sequence>/`` (plus the package's copyright file) into
    ``cache/<sequence>/`` and writes a marker with the package version. A second call finds
    the marker and downloads nothing. The folder appears atomically: a partial fetch is never
    mistaken for a complete one. Raises :class:`DataUnavailableError` when apt cannot fetch.
    """
    if not _SEQUENCE_RE.fullmatch(sequence):
        raise ValueError(f'invalid sequence name {sequence!r}')
    cache = Path(cache if cache is not None else default_cache_dir())
    found = cached_sequence(cache, sequence)
    if found is not None:
        return found
    folder = cache / sequence
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix='.fetch-', dir=cache) as tmp_name:
        tmp = Path(tmp_name)
        download = tmp / 'deb'
        download.mkdir()
        proc = _run(['apt-get', 'download', PACKAGE], cwd=download)
        debs = sorted(download.glob(f'{PACKAGE}_*.deb'))
        if proc.returncode != 0 or not debs:
            raise DataUnavailableError(
                f'apt-get download {PACKAGE} failed (no network or unknown package?): '
                f'{_stderr_tail(proc)}'
            )
        deb = debs[0]
        version = _run(['dpkg-deb', '-f', str(deb), 'Version'], cwd=download).stdout.strip()
        staging = tmp / sequence
        staging.mkdir()
        count = _extract(deb, sequence, staging)
        if count == 0:
            raise DataUnavailableError(
                f'{PACKAGE} {version or "(unknown version)"} has no ViSP-images/{sequence}/ folder'
            )
        marker = {
            'package': PACKAGE,
            'version': version,
            'sequence': sequence,
            'frames': count,
            'deb': deb.name,
        }
        (staging / MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True) + '\n')
        staging.chmod(0o755)
        if folder.exists():
            shutil.rmtree(folder)  # an incomplete earlier fetch: no valid marker
        try:
            os.replace(staging, folder)
        except OSError:
            # A concurrent fetch finished first: use its (complete) result.
            found = cached_sequence(cache, sequence)
            if found is None:
                raise
            return found
    return folder


def list_frames(folder: Path) -> list[Path]:
    """Return the image files in ``folder``, sorted by name (ViSP names are zero-padded)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(folder, 'frame folder not found')
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES
    )
