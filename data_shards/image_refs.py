"""Image references found in annotation data -> the location the builder may read, or a refusal.

An annotation record names its images (``image``, ``images``, ``image_rpath``, ``file_name``). Those
strings are data, written by whoever made the dataset, so they may choose neither a command to run nor a
file outside the dataset. Only configuration (``--image-root``, ``--allow-image-scheme``) widens that::

    refs = ImageReferences("images", allowed_schemes=("s3",))
    refs.resolve("train/0001.jpg")          # -> "images/train/0001.jpg"
    refs.resolve("s3://bucket/x.jpg")       # -> kept: s3 was allowed
    refs.resolve("pipe:cat x.jpg")          # -> ImageReferenceRefused

The rules:
- a relative path joins ``--image-root`` and must stay under it once ``..`` parts are resolved;
- an absolute path (or ``file://`` URL) is kept when it lies under a local ``--image-root``;
- an ``s3://`` or ``hdfs://`` URL is kept when it lies under ``--image-root``, or when its scheme was
  allowed with ``--allow-image-scheme``;
- everything else is refused: ``pipe:`` commands (they come only from configuration), any other scheme
  (``http:``, ``gs:``, ... and anything that starts like one, such as ``name:x.jpg``), control characters.

Paths are compared as written (``..`` resolved lexically); a symlink inside the root is the dataset
owner's choice and is followed. Used by :mod:`data_shards.adapters`; the builder counts a refusal as the
reject reason ``image reference not allowed``.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Iterable

ALLOWABLE_SCHEMES = ("s3", "hdfs")
REFUSED_REASON = "image reference not allowed"

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


class ImageReferenceRefused(ValueError):
    """A data value that may not be read as an image; the message names the value and the rule it broke."""


def _url_parts(url: str) -> tuple[str, str]:
    """``s3://bucket/a/../b`` -> (``s3://bucket``, ``/b``): the authority, and the path with ``..`` resolved."""
    scheme, _, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    return f"{scheme.lower()}://{authority}", posixpath.normpath("/" + path) if slash else "/"


def _under(path: str, root: str, separator: str) -> bool:
    return path == root or path.startswith(root.rstrip(separator) + separator)


class ImageReferences:
    """Resolves the image strings of one build against its ``--image-root`` (a folder or an s3/hdfs URL)."""

    def __init__(self, image_root: str, allowed_schemes: Iterable[str] = ()) -> None:
        if not image_root:
            raise ValueError("an image root is needed to resolve image paths; pass --image-root")
        unknown = sorted(set(allowed_schemes) - set(ALLOWABLE_SCHEMES))
        if unknown:
            raise ValueError(f"--allow-image-scheme {unknown[0]!r} is not supported; choose from "
                             f"{', '.join(ALLOWABLE_SCHEMES)}")
        self.root = image_root
        self.allowed_schemes = frozenset(allowed_schemes)
        match = _SCHEME.match(image_root)
        self.root_scheme = match.group(1).lower() if match and image_root[match.end():].startswith("//") else None
        if self.root_scheme == "file":
            self.root, self.root_scheme = image_root[len("file://"):], None
        if self.root_scheme is not None and self.root_scheme not in ALLOWABLE_SCHEMES:
            raise ValueError(f"--image-root {image_root!r}: use a local folder or an s3:// or hdfs:// URL")
        # Computed once: a build resolves millions of image strings against the same root.
        self._root_url = _url_parts(self.root) if self.root_scheme is not None else None
        self._root_absolute = os.path.abspath(self.root)

    def resolve(self, image: str) -> str:
        """The location to read for ``image``; raises :class:`ImageReferenceRefused` naming the value."""
        if _CONTROL_CHARACTERS.search(image):
            raise ImageReferenceRefused(f"{image!r} contains a control character")
        match = _SCHEME.match(image)
        if match is None:
            return self._path(image)
        scheme = match.group(1).lower()
        url_like = image[match.end():].startswith("//")
        if scheme == "file" and url_like:
            return self._path(image[len("file://"):])
        if scheme in ALLOWABLE_SCHEMES and url_like:
            if self.root_scheme is not None and self._url_under_root(image):
                return "".join(_url_parts(image))  # what was checked is what gets read
            if scheme in self.allowed_schemes:
                return image
            raise ImageReferenceRefused(f"{image!r}: {scheme}:// images outside --image-root are read only "
                                        f"with --allow-image-scheme {scheme}")
        if scheme == "pipe":
            raise ImageReferenceRefused(f"{image!r}: pipe: commands come only from configuration, never from data")
        raise ImageReferenceRefused(f"{image!r}: '{scheme}:' is not a readable image location; give a path "
                                    f"under --image-root or an s3:// or hdfs:// URL")

    def _url_under_root(self, url: str) -> bool:
        authority, path = _url_parts(url)
        root_authority, root_path = self._root_url
        return authority == root_authority and _under(path, root_path, "/")

    def _path(self, image: str) -> str:
        if self.root_scheme is not None:
            if image.startswith("/"):
                raise ImageReferenceRefused(f"{image!r} is a local path, but --image-root is {self.root}")
            joined = self.root.rstrip("/") + "/" + image
            if not self._url_under_root(joined):
                raise ImageReferenceRefused(f"{image!r} leads outside --image-root {self.root}")
            return "".join(_url_parts(joined))
        # The normalised path is what gets opened, so a '..' after a symlink cannot lead elsewhere than checked.
        resolved = os.path.normpath(os.path.join(self.root, image))
        inside = _under(os.path.abspath(resolved), self._root_absolute, os.sep) or _under(
            os.path.realpath(resolved), os.path.realpath(self.root), os.sep)  # a root that is a symlink
        if not inside:
            where = "lies" if os.path.isabs(image) else "leads"
            raise ImageReferenceRefused(f"{image!r} {where} outside --image-root {self.root}")
        return resolved
