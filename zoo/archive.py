"""Taking one model file out of a zoo .tar.gz without trusting the archive.

The zoo's archives hold the model plus `test_data_set_*` folders, and sometimes macOS
AppleDouble `._*` files. A hostile or broken archive could hold paths that climb out of the
extraction folder, links, or devices: any such member makes the whole archive refused.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from zoo.errors import InvalidModelFile, UnsafeFile
from zoo.files import disk_errors


def _is_apple_double(name: str) -> bool:
    """macOS metadata files (`._model.onnx`, `__MACOSX/...`): never the model."""
    path = PurePosixPath(name)
    return path.name.startswith("._") or "__MACOSX" in path.parts


def check_member(member: tarfile.TarInfo, archive: Path) -> None:
    """Refuse a member that is not a plain file or folder inside the archive's own tree."""
    name = member.name
    where = f"archive {archive.name} holds {name!r}"
    if (
        name.startswith(("/", "\\"))
        or PurePosixPath(name).is_absolute()
        or ":" in name.split("/")[0]
    ):
        raise UnsafeFile(
            f"{where}, an absolute path; it was refused, get the archive from a trusted source"
        )
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        raise UnsafeFile(f"{where}, which climbs out of the folder with '..'; it was refused")
    if member.issym() or member.islnk():
        raise UnsafeFile(
            f"{where}, a {'symbolic' if member.issym() else 'hard'} link to {member.linkname!r}; "
            "archives with links are refused"
        )
    if member.ischr() or member.isblk() or member.isfifo():
        raise UnsafeFile(f"{where}, a device or FIFO; archives with special files are refused")
    if not (member.isfile() or member.isdir()):
        raise UnsafeFile(f"{where}, of unknown type {member.type!r}; it was refused")


def _pick(
    members: list[tarfile.TarInfo], member_name: str | None, archive: Path
) -> tarfile.TarInfo:
    """The model member: exact basename `member_name`, else the archive's only .onnx file."""
    files = [m for m in members if m.isfile() and not _is_apple_double(m.name)]
    named = [m for m in files if member_name and PurePosixPath(m.name).name == member_name]
    if not named:
        named = [m for m in files if m.name.lower().endswith(".onnx")]
        if not named:
            raise InvalidModelFile(
                f"archive {archive.name} holds no {member_name or '.onnx file'}; "
                "check that it is an ONNX Model Zoo archive"
            )
    if len(named) > 1:
        listed = ", ".join(m.name for m in named)
        raise UnsafeFile(
            f"archive {archive.name} holds {len(named)} candidate models ({listed}); refusing to "
            "guess which is the model, extract the one you want and pass its .onnx path"
        )
    return named[0]


def extract_member(
    archive: str | os.PathLike[str], member_name: str | None, dest_dir: str | os.PathLike[str]
) -> Path:
    """Extract the model from a .tar.gz into `dest_dir/<basename>`; returns its path.

    The member is the one whose basename is `member_name`; when none is (or it is None), the
    archive's only .onnx file. Every member is checked first; one unsafe member refuses them all.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    try:
        tar = tarfile.open(archive, "r:*")  # noqa: SIM115 - closed by the with block below
    except (tarfile.TarError, OSError) as exc:
        raise InvalidModelFile(
            f"{archive} is not a readable .tar.gz ({exc}); fetch it again"
        ) from exc
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise InvalidModelFile(f"{archive} is damaged ({exc}); fetch it again") from exc
        for member in members:
            check_member(member, archive)
        member = _pick(members, member_name, archive)
        staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest_dir))
        try:
            # The data filter is a second line of defence: it re-checks paths and strips modes.
            extract_kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            try:
                with disk_errors(dest_dir):
                    tar.extract(member, staging, **extract_kwargs)
            except tarfile.FilterError as exc:
                raise UnsafeFile(f"archive {archive.name}: {exc}; it was refused") from exc
            except (tarfile.TarError, EOFError) as exc:
                raise InvalidModelFile(f"{archive} is damaged ({exc}); fetch it again") from exc
            extracted = staging / member.name
            target = dest_dir / PurePosixPath(member.name).name
            os.replace(extracted, target)
        finally:
            with contextlib.suppress(OSError):
                shutil.rmtree(staging)
    return target
