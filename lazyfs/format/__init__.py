"""Pure, synchronous format code: TOC, footers, chunk codecs, OCI documents.

Nothing here imports FUSE, HTTP or trio; everything works on bytes.
"""

# The seekable formats, by the name `convert --format` takes, and each one's chunk codec. Here,
# in the package's light top, so that the command line can list them without importing the
# format modules (which import tarfile, zlib-ng and zstandard: a cold start's time).
MEDIA_CODEC = {"estargz": "gzip", "zstd:chunked": "zstd"}
FORMATS = tuple(MEDIA_CODEC)
