"""Streaming runtime: a Session owns one stream's state; a SessionPool steps many streams as one batch.

States save to self-checking bytes (versioned, sha256-checksummed, tied to the model by a fingerprint) and
restore to continue exactly where they stopped.
"""

from leanseq.stream.blob import FORMAT_VERSION, StateBlobError, StateMismatchError, fingerprint
from leanseq.stream.pool import SessionPool
from leanseq.stream.session import Session

__all__ = ["FORMAT_VERSION", "Session", "SessionPool", "StateBlobError", "StateMismatchError", "fingerprint"]
