"""How tar header fields map onto TOC fields; shared by the converter and `verify`."""

from __future__ import annotations

import tarfile

# tar type flag -> TOC entry type. GNU sparse files are regular files once expanded.
TOC_TYPE_OF_TAR_TYPE = {
    tarfile.REGTYPE: "reg", tarfile.AREGTYPE: "reg", tarfile.CONTTYPE: "reg",
    tarfile.GNUTYPE_SPARSE: "reg", tarfile.LNKTYPE: "hardlink", tarfile.SYMTYPE: "symlink",
    tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block", tarfile.DIRTYPE: "dir",
    tarfile.FIFOTYPE: "fifo",
}

XATTR_PAX_PREFIX = "SCHILY.xattr."


def tar_xattrs(info: tarfile.TarInfo) -> dict[str, bytes]:
    """Extended attributes of a tar member, from its `SCHILY.xattr.*` PAX records.

    tarfile decodes PAX values as UTF-8 with surrogateescape: encoding back the same way
    restores binary values such as security.capability byte for byte.
    """
    return {
        key[len(XATTR_PAX_PREFIX):]: value.encode("utf-8", "surrogateescape")
        for key, value in info.pax_headers.items()
        if key.startswith(XATTR_PAX_PREFIX)
    }
