"""Pure, synchronous format code: TOC, footers, chunk codecs, OCI documents.

Nothing here imports FUSE, HTTP or trio; everything works on bytes.
"""
